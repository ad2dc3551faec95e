"""Tiny random models, tokenizers, SAEs and adapters, on-disk setups with a real `fsrl serve`
on them, and a headless browser: what the tests, the scripts and the benches build on (no
network, no weights beyond what they make themselves).

The browser is Debian's `chromium` (`make browser` installs it) driven by Playwright; its own
browser download is never used.
"""

from __future__ import annotations

import importlib.util
import json
import string
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import torch

from fsrl.adapter import FsrlAdapter, new_adapter, save_adapter
from fsrl.models import BaseModel, model_fingerprint
from fsrl.sae import Sae, random_sae, save_sae
from fsrl.testing.server_process import ServerProcess

if TYPE_CHECKING:
    from playwright.sync_api import Browser

# ------------------------------------------------------------------------------ tiny builders

CHARS = string.printable  # 100 characters, one token each


def tiny_tokenizer():
    """A character-level fast tokenizer with a chat template, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    for ch in CHARS:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant: {% endif %}")
    return fast


def tiny_model(n_layers: int = 4, hidden: int = 64, vocab: int = 104, seed: int = 0,
               dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=True, initializer_range=0.3)
    model = LlamaForCausalLM(cfg).to(dtype).eval().requires_grad_(False)
    return model


# model_type -> the config of a tiny random model of that family (4 layers, hidden 64, the tiny
# tokenizer's vocabulary): what the any-model tests steer. Adding a family is adding a row.
TINY_FAMILIES: dict[str, dict] = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {"head_dim": 16}, "olmo2": {},
    "phi3": {"pad_token_id": 0},
    "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8},
    "gemma3_text": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8},
    "gpt2": {"n_embd": 64, "n_layer": 4, "n_head": 4, "n_positions": 512},
    "gpt_neox": {"rotary_pct": 0.5},
}


def tiny_family_model(family: str, n_layers: int = 4, hidden: int = 64, vocab: int = 104, seed: int = 0):
    """A tiny random causal LM of a transformers family (a key of TINY_FAMILIES)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2,
                  num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  initializer_range=0.3)
    extra = {key: hidden // 4 if key in ("head_dim", "query_pre_attn_scalar") else value  # 4 heads
             for key, value in TINY_FAMILIES[family].items()}
    if family == "gpt2":
        extra["n_embd"] = hidden
    cfg = AutoConfig.for_model(family, **{**common, **extra})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval().requires_grad_(False)


def tiny_base(seed: int = 0, **kwargs) -> BaseModel:
    model = tiny_model(seed=seed, **kwargs)
    return BaseModel(model=model, tokenizer=tiny_tokenizer(), name="tiny-llama",
                     fingerprint=model_fingerprint(model))


def tiny_sae(d_in: int = 64, d_sae: int = 256, architecture: str = "topk", layer: int = 1,
             seed: int = 0) -> Sae:
    return random_sae(d_in, d_sae, architecture=architecture, k=16, layer=layer, seed=seed)


def tiny_adapter(sae: Sae, base: BaseModel | None = None, adapter_id: str = "tiny",
                 activation: str = "relu", clamp_nonnegative: bool = False, seed: int = 1,
                 layer: int = 1) -> FsrlAdapter:
    """An adapter with weights large enough to push a sparse set of features."""
    adapter = new_adapter(adapter_id, sae, base.name if base else "tiny-llama",
                          base.fingerprint if base else "0", layer=layer, activation=activation,
                          clamp_nonnegative=clamp_nonnegative, init_std=0.0, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        adapter.W.copy_(torch.randn(sae.d_in, sae.d_sae, generator=g) * 0.3)
        adapter.b.copy_(torch.randn(sae.d_sae, generator=g) * 0.5 - 1.5)
        adapter.tau.fill_(0.5)
    return adapter.requires_grad_(False)


def tiny_pairs(path: Path, n: int = 24) -> Path:
    """Preference pairs a tiny model can pick up: chosen answers say "yes!", rejected "no."."""
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"prompt": f"q{i} {'abc' * (i % 4)}?", "chosen": "yes! " * (1 + i % 3),
                                 "rejected": "no. " * (1 + (i + 1) % 3)}) + "\n")
    return path


# --------------------------------------------------------------- on-disk setups and servers

LAYER = 1
D_SAE = 256


@dataclass
class TinySetup:
    model_dir: Path
    sae_dir: Path
    adapters_dir: Path
    outside_dir: Path  # a valid adapter folder outside the adapters directory


def write_tiny_setup(root: Path, hidden: int = 64) -> TinySetup:
    """Tiny model + tokenizer, a labelled tiny SAE, and an adapters directory holding:
    `tiny` (good), `more/tiny-b` (good, other weights, nested so not loaded at start),
    `corrupt` (unreadable weights), `other-sae` (made for another SAE), `escape` (a symlink
    to a folder outside), `bad-meta` (a string where adapter.json needs a boolean), `link-out`
    (a weights file that links outside), plus `no-meta` (no adapter.json, ignored).
    `hidden` 128 makes heads of 32, which vLLM's CPU attention takes (16 it does not)."""
    model_dir, sae_dir, adapters = root / "model", root / "sae", root / "adapters"
    model, tokenizer = tiny_model(hidden=hidden), tiny_tokenizer()
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    fingerprint = model_fingerprint(model)

    sae = tiny_sae(d_in=hidden, d_sae=D_SAE, layer=LAYER)
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

    other = tiny_adapter(tiny_sae(d_in=hidden, d_sae=D_SAE, layer=LAYER, seed=7), None, adapter_id="other",
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


def write_bench_setup(root: Path, hidden: int = 64, n_layers: int = 2, d_sae: int = 256, layer: int = 1,
                      adapters: int = 2, l0: int = 16) -> TinySetup:
    """A random model of the given shape with the tiny tokenizer, a random top-k SAE and
    `adapters` synthetic adapters (about `l0` features firing a token, `fsrl bench`'s kind):
    what `fsrl bench --serving` serves on a machine with no model to download (gpu_check.py)."""
    from fsrl.bench.shapes import calibration_activations, synthetic_adapter

    model_dir, sae_dir, adapters_dir = root / "model", root / "sae", root / "adapters"
    model, tokenizer = tiny_model(n_layers=n_layers, hidden=hidden), tiny_tokenizer()
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    base = BaseModel(model=model, tokenizer=tokenizer, name=model_dir.name, fingerprint=model_fingerprint(model))
    sae = tiny_sae(d_in=hidden, d_sae=d_sae, layer=layer)
    save_sae(sae, sae_dir)
    calibration = calibration_activations(base, sae.site_at(layer))
    for i in range(adapters):
        save_adapter(synthetic_adapter(sae, base, layer, l0, calibration, seed=i), adapters_dir / f"synthetic-{i}")
    return TinySetup(model_dir, sae_dir, adapters_dir, outside_dir=root / "outside")


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
    if done.returncode != 0:
        raise RuntimeError(f"fsrl features build failed: {done.stderr[-2000:]}")


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


# ------------------------------------------------------------------------------- the browser

CHROMIUM = Path("/usr/bin/chromium")
# Headless as root in a container; the background-networking flags keep Chromium from dialling
# Google's hosts, which a closed network refuses at every start.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (make browser installs Debian's chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (it is in the dev extra: pip install -e '.[dev]')"
    return None


@contextmanager
def headless_chromium() -> Iterator["Browser"]:
    """A headless Chromium, closed on the way out."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield browser
        finally:
            browser.close()
