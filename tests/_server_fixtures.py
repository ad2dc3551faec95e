"""What the server's test files share: fixtures and helpers, imported by name (tests/conftest.py
holds only what is one per session, and the tiny builders live in `fsrl.testing`).

Each test file that imports the fixtures gets its own tiny setup (`write_tiny_setup`) and:
- `client`: an HTTP client of the app `fsrl serve` runs, served by uvicorn on a loopback port
  from a thread of this process (real HTTP, the full lifespan: model, SAE, adapters and engine
  load as in a real start, without starting a new interpreter), with the tiny server's settings;
- `app_factory`: more such servers on the same files with other settings (auth, limits);
- `openai_client`: the official openai client of `client`'s server;
- `server`: a real `fsrl serve` process with the same settings (a subprocess: tests that use it
  are marked slow).

The contract's route files run on both engines: they take `engine_setup` and `engine_client`
as `setup` and `client`, parametrized by `engine`: "default" (the in-thread server above) and
"vllm" (`fsrl serve --engine vllm` as a subprocess on a tiny model vLLM's CPU attention takes;
slow, skipped where vLLM is not installed). A test that reaches into the default engine's
process (its state, other settings) takes `default_engine`, which skips it on vLLM.

The vLLM server is one process for the whole session (`vllm_server`, a SharedVllmServer on
`vllm_setup`; both fixtures live in tests/conftest.py): the route files' `vllm` cases (they carry
the `shared_vllm` mark) and tests/test_vllm_serving.py talk to it. After each test that does,
tests/conftest.py puts the server's adapters back as found at its start (and errors the test
that left them changed), and after the last one it stops the process by its PID.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from fsrl.testing.server_process import ServerProcess, free_port
from fsrl.testing import TinySetup, serving, tiny_server_args, write_tiny_setup
from server.cli import HTTP_PARSER

CAP = 400  # the tiny server's --max-new-tokens-cap
ERROR_KEYS = {"message", "type", "code"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> TinySetup:
    return write_tiny_setup(tmp_path_factory.mktemp("tiny"))


class ServedClient(httpx.Client):
    """An HTTP client of one app served by uvicorn on loopback from a thread of this process;
    entering starts the server (and its lifespan), leaving stops it. `app_state` is the
    lifespan's state, for tests that reach into the engine."""

    def __init__(self, app, start_timeout_s: float = 120.0):
        import uvicorn

        port = free_port()
        super().__init__(base_url=f"http://127.0.0.1:{port}", timeout=60)
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                          http=HTTP_PARSER))
        self._thread = threading.Thread(target=self._server.run, name="test-uvicorn", daemon=True)
        self._start_timeout_s = start_timeout_s

    @property
    def app_state(self) -> dict[str, Any]:
        return self._server.lifespan.state

    def __enter__(self) -> "ServedClient":
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-thread server did not start (see the log above)")
            time.sleep(0.05)
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._server.should_exit = True
        self._thread.join(timeout=30)


@pytest.fixture(scope="module")
def app_factory(setup):
    from server.app import create_app
    from server.settings import Settings

    def make(**settings) -> ServedClient:
        return ServedClient(create_app(Settings(
            model=str(setup.model_dir), sae=setup.sae_dir, adapters_dir=setup.adapters_dir,
            device="cpu", **settings)))
    return make


@pytest.fixture(scope="module")
def client(app_factory):
    """The tiny server (uvicorn in a thread): `--max-new-tokens-cap 400 --pack-cpu-weights`."""
    with app_factory(max_new_tokens_cap=CAP, pack_cpu_weights=True) as c:
        yield c


def _serve_tiny(setup, tmp_path_factory):
    return serving(tiny_server_args(setup, "--max-new-tokens-cap", str(CAP), "--pack-cpu-weights"),
                   tmp_path_factory.mktemp("log") / "server.log")


@pytest.fixture(scope="module")
def server(setup, tmp_path_factory):
    """The tiny server as a real `fsrl serve` process on loopback (slow: a subprocess)."""
    with _serve_tiny(setup, tmp_path_factory) as proc:
        yield proc


@pytest.fixture(scope="module")
def default_engine_server(engine, setup, tmp_path_factory):
    """`server`, in a file parametrized by `engine`: skipped on vLLM before a process starts."""
    if engine != "default":
        pytest.skip("a default-engine process (`server`)")
    with _serve_tiny(setup, tmp_path_factory) as proc:
        yield proc


VLLM_MISSING = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                  reason="vLLM is not installed (`make vllm`; `make test` installs it)")
SHARED_VLLM = "shared_vllm"  # the mark of a test that talks to the session's vLLM server (tests/conftest.py)
ENGINES = ["default", pytest.param("vllm", marks=[pytest.mark.slow, VLLM_MISSING, getattr(pytest.mark, SHARED_VLLM)])]


@pytest.fixture(scope="module", params=ENGINES)
def engine(request) -> str:
    return request.param


HIDDEN = {"default": 64, "vllm": 128}  # the tiny model's width: vLLM's CPU attention takes heads of 32, not 16
# `client`'s cap; two bank slots, so that tests loading adapters beyond them page them in and out.
VLLM_SERVER_ARGS = ("--max-new-tokens-cap", str(CAP), "--engine", "vllm", "--adapter-slots", "2")


def _as_loaded(described: dict) -> dict:
    """An /adapters entry without where it sits now (paging moves it between host and bank)."""
    return {k: v for k, v in described.items() if k not in ("status", "device")}


class SharedVllmServer:
    """`fsrl serve --engine vllm` (VLLM_SERVER_ARGS) on `setup`: started once, stopped by its PID.
    `found` is its adapters as /adapters listed them right after the start."""

    def __init__(self, setup: TinySetup, log_dir):
        self.setup, self.log_dir = setup, log_dir
        self.proc: ServerProcess | None = None
        self.found: list[dict] = []

    @property
    def url(self) -> str:
        if self.proc is None:
            raise RuntimeError("the shared vLLM server is stopped: a test that talks to it needs the "
                               f"`{SHARED_VLLM}` mark (tests/conftest.py stops it after the last marked test)")
        return self.proc.url

    def start(self) -> "SharedVllmServer":
        for attempt in (1, 2):
            proc = ServerProcess(tiny_server_args(self.setup, *VLLM_SERVER_ARGS),
                                 log_path=self.log_dir / f"vllm-server-{attempt}.log")
            try:
                proc.wait_ready(timeout_s=600, max_polls=6000)
                break
            except RuntimeError as exc:
                proc.stop()
                # free_port() frees the port before the server binds it; vLLM's own sockets, made
                # meanwhile, can take it. One more start on another port, then give up.
                if attempt == 2 or "address already in use" not in str(exc):
                    raise
        self.proc = proc
        self.found = self.adapters()
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def adapters(self) -> list[dict]:
        r = httpx.get(f"{self.url}/adapters", timeout=60)
        r.raise_for_status()
        return r.json()["adapters"]

    def put_back(self) -> list[str]:
        """Its adapters back as `found`: loaded since unloaded, changed or unloaded ones reloaded
        from their folders (an adapter found at start has its folder's name). Returns what was
        changed, empty when nothing was."""
        found = {a["id"]: _as_loaded(a) for a in self.found}
        now = {a["id"]: _as_loaded(a) for a in self.adapters()}
        changed = []
        with httpx.Client(base_url=self.url, timeout=120) as c:
            for adapter_id in sorted(now.keys() - found.keys()):
                c.delete(f"/adapters/{adapter_id}").raise_for_status()
                changed.append(f"{adapter_id!r} left loaded")
            for adapter_id, described in found.items():
                if now.get(adapter_id) != described:
                    c.post("/adapters", json={"id": adapter_id, "path": adapter_id, "replace": True}).raise_for_status()
                    changed.append(f"{adapter_id!r} {'changed' if adapter_id in now else 'unloaded'}")
        if changed and {a["id"]: _as_loaded(a) for a in self.adapters()} != found:
            raise RuntimeError(f"the shared vLLM server's adapters could not be put back: {self.adapters()}")
        return changed


@pytest.fixture(scope="module")
def engine_setup(tmp_path_factory, engine, request) -> TinySetup:
    """The tiny setup, `HIDDEN[engine]` wide (on vLLM: the shared server's)."""
    if engine == "vllm":
        return request.getfixturevalue("vllm_setup")
    return write_tiny_setup(tmp_path_factory.mktemp(f"tiny-{engine}"), hidden=HIDDEN[engine])


@pytest.fixture(scope="module")
def engine_client(engine, app_factory, request):
    """The tiny server on `engine`, with `client`'s settings (on vLLM: the shared server)."""
    if engine == "default":
        with app_factory(max_new_tokens_cap=CAP, pack_cpu_weights=True) as c:
            yield c
        return
    with httpx.Client(base_url=request.getfixturevalue("vllm_server").url, timeout=120) as c:
        yield c


@pytest.fixture
def default_engine(engine) -> None:
    """For tests that reach into the default engine's process: skipped on vLLM."""
    if engine != "default":
        pytest.skip("reaches into the default engine's process (its state or other settings)")


@pytest.fixture(scope="module")
def openai_client(client):
    import openai
    yield openai.OpenAI(base_url=str(client.base_url).rstrip("/") + "/v1", api_key="unused", max_retries=0,
                        timeout=60)


def generate(client, **body) -> dict:
    body.setdefault("max_new_tokens", 8)
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def assert_error(r: httpx.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert ERROR_KEYS <= error.keys() and isinstance(error["message"], str)
    for word in words:
        assert word in error["message"], error["message"]
    return error


@dataclass(frozen=True)
class WatchPoints:
    """Conditions chosen on `setup`'s own activations for one prompt's greedy, unsteered
    continuation (what the server generates for it): `when` passes at some positions of the
    prompt and not at others; `abort` first passes at generated token `abort_at` (1-based)."""

    when: dict
    abort: dict
    abort_at: int


def watch_points(setup: TinySetup, prompt: str, max_new_tokens: int, abort_at: int = 3) -> WatchPoints:
    import torch

    from fsrl.generation import GenerationRequest, Generator
    from fsrl.models import load_base_model
    from fsrl.sae import load_sae
    from fsrl.sampling import SamplingParams

    base, sae = load_base_model(str(setup.model_dir), device="cpu"), load_sae(setup.sae_dir)
    generator = Generator(base, sae)
    prompt_ids = base.tokenizer(prompt)["input_ids"]
    sampling = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    tokens = generator.generate([GenerationRequest(prompt_ids, sampling=sampling)])[0].token_ids
    with torch.inference_mode():
        ids = torch.tensor([prompt_ids + tokens])
        f = sae.encode(base.activations(generator.site, ids, torch.ones_like(ids))[0].to(sae.W_dec.dtype))
    n = len(prompt_ids)
    on_prompt = f[:n]
    j = int(on_prompt.gt(0).sum(0).argmax())  # the feature active at most prompt positions
    values = on_prompt[:, j].unique()
    when = {"index": j, "above": float(values[len(values) // 2 - 1] + values[len(values) // 2]) / 2}
    # A feature quiet on the first abort_at - 1 generated positions and active on the next.
    quiet, fires = f[n:n + abort_at - 1], f[n + abort_at - 1]
    margin = fires - quiet.max(0).values.clamp(min=0)
    k = int(margin.argmax())
    assert margin[k] > 0, "no feature first fires at that generated token"
    abort = {"index": k, "above": float(fires[k] - margin[k] / 2)}
    return WatchPoints(when, abort, abort_at)
