"""A real `fsrl serve` process on tiny random files, for tests that go through HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from factories import tiny_adapter, tiny_model, tiny_sae, tiny_tokenizer
from fsrl.adapter import save_adapter
from fsrl.models import model_fingerprint
from fsrl.sae import save_sae
from fsrl.server_process import ServerProcess, free_port  # noqa: F401  (the tests' import point)

LAYER = 1
D_SAE = 256


@dataclass
class TinySetup:
    model_dir: Path
    sae_dir: Path
    adapters_dir: Path
    outside_dir: Path  # a valid adapter folder outside the adapters directory


def write_tiny_setup(root: Path) -> TinySetup:
    """Tiny model + tokenizer, a labelled tiny SAE, and an adapters directory holding:
    `tiny` (good), `more/tiny-b` (good, other weights, nested so not loaded at start),
    `corrupt` (unreadable weights), `other-sae` (made for another SAE), `escape` (a symlink
    to a folder outside), `bad-meta` (a string where adapter.json needs a boolean), `link-out`
    (a weights file that links outside), plus `no-meta` (no adapter.json, ignored)."""
    model_dir, sae_dir, adapters = root / "model", root / "sae", root / "adapters"
    model, tokenizer = tiny_model(), tiny_tokenizer()
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    fingerprint = model_fingerprint(model)

    sae = tiny_sae(d_sae=D_SAE, layer=LAYER)
    sae.info.labels = {i: f"feature {i}" for i in range(0, D_SAE, 2)}  # odd ones unlabelled
    save_sae(sae, sae_dir)

    good = tiny_adapter(sae, None, adapter_id="tiny", layer=LAYER)
    good.config.base_model = {"name": model_dir.name, "fingerprint": fingerprint}
    save_adapter(good, adapters / "tiny")
    other_weights = tiny_adapter(sae, None, adapter_id="tiny-b", layer=LAYER, seed=2)
    other_weights.config.base_model = dict(good.config.base_model)
    save_adapter(other_weights, adapters / "more" / "tiny-b")  # nested: not loaded at start

    save_adapter(good, adapters / "corrupt")
    (adapters / "corrupt" / "adapter.safetensors").write_bytes(b"not a safetensors file")

    other = tiny_adapter(tiny_sae(d_sae=D_SAE, layer=LAYER, seed=7), None, adapter_id="other",
                         layer=LAYER)
    other.config.base_model = dict(good.config.base_model)
    save_adapter(other, adapters / "other-sae")

    outside = root / "outside" / "stray"
    save_adapter(good, outside)
    (adapters / "escape").symlink_to(outside, target_is_directory=True)
    (adapters / "no-meta").mkdir()

    save_adapter(good, adapters / "bad-meta")  # "clamp_nonnegative": "false" is not a boolean
    meta = json.loads((adapters / "bad-meta" / "adapter.json").read_text())
    (adapters / "bad-meta" / "adapter.json").write_text(json.dumps({**meta, "clamp_nonnegative": "false"}))
    save_adapter(good, adapters / "link-out")  # its weights are a link to a file outside
    (adapters / "link-out" / "adapter.safetensors").unlink()
    (adapters / "link-out" / "adapter.safetensors").symlink_to(outside / "adapter.safetensors")
    return TinySetup(model_dir, sae_dir, adapters, outside)


DASHBOARD_CORPUS = ["Here is a list: apples, pears and plums. The list goes on and on.",
                    "I am sorry, I apologize for the confusion. Sorry again!",
                    "The quick brown fox jumps over the lazy dog. " * 6]


def build_tiny_dashboards(setup: TinySetup, root: Path) -> None:
    """`fsrl features build` over DASHBOARD_CORPUS: dashboards and rule labels (replacing the
    setup's placeholder labels) beside the tiny SAE, so /features search has something to find."""
    (setup.sae_dir / "feature_labels.json").unlink(missing_ok=True)
    corpus = root / "corpus.txt"
    corpus.write_text("\n<|endoftext|>\n".join(DASHBOARD_CORPUS))
    done = subprocess.run([sys.executable, "-m", "fsrl.cli", "features", "build", "--sae", str(setup.sae_dir),
                           "--model", str(setup.model_dir), "--text", str(corpus), "--device", "cpu",
                           "--context-size", "24", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def tiny_server_args(setup: TinySetup, *extra: str) -> list[str]:
    """`fsrl serve` flags for the tiny setup on the CPU, then `extra`."""
    return ["--model", str(setup.model_dir), "--sae", str(setup.sae_dir),
            "--adapters-dir", str(setup.adapters_dir), "--device", "cpu", *extra]


@contextmanager
def serving(args: list[str], log_path: Path, timeout_s: float = 120.0, max_polls: int = 1200,
            env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    """`fsrl serve` with `args` (and `env` over this process's environment) on loopback,
    ready; stopped by its PID on the way out."""
    proc = ServerProcess(args, env=env, log_path=log_path)
    try:
        proc.wait_ready(timeout_s=timeout_s, max_polls=max_polls)
        yield proc
    finally:
        proc.stop()


def read_sse(response: httpx.Response, max_events: int = 10_000) -> tuple[list[dict], bool]:
    """The JSON events of a server-sent-event stream, and whether it ended with [DONE]."""
    events: list[dict] = []
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            return events, True
        events.append(json.loads(data))
        if len(events) >= max_events:
            break
    return events, False
