"""What the server's test files share: fixtures and helpers, imported by name (the project
keeps no conftest.py, and the tiny builders live in `fsrl.testing`).

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
"""

from __future__ import annotations

import importlib.util
import threading
import time
from typing import Any

import httpx
import pytest

from fsrl.server_process import free_port
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


@pytest.fixture(scope="module")
def server(setup, tmp_path_factory):
    """The tiny server as a real `fsrl serve` process on loopback (slow: a subprocess)."""
    with serving(tiny_server_args(setup, "--max-new-tokens-cap", str(CAP), "--pack-cpu-weights"),
                 tmp_path_factory.mktemp("log") / "server.log") as proc:
        yield proc


ENGINES = ["default", pytest.param("vllm", marks=[
    pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                         reason="vLLM is not installed (`make vllm`; `make test` installs it)")])]


@pytest.fixture(scope="module", params=ENGINES)
def engine(request) -> str:
    return request.param


HIDDEN = {"default": 64, "vllm": 128}  # the tiny model's width: vLLM's CPU attention takes heads of 32, not 16


@pytest.fixture(scope="module")
def engine_setup(tmp_path_factory, engine) -> TinySetup:
    """The tiny setup, `HIDDEN[engine]` wide."""
    return write_tiny_setup(tmp_path_factory.mktemp(f"tiny-{engine}"), hidden=HIDDEN[engine])


@pytest.fixture(scope="module")
def engine_client(engine, setup, app_factory, tmp_path_factory):
    """The tiny server on `engine`, with `client`'s settings."""
    if engine == "default":
        with app_factory(max_new_tokens_cap=CAP, pack_cpu_weights=True) as c:
            yield c
        return
    with serving(tiny_server_args(setup, "--max-new-tokens-cap", str(CAP), "--engine", "vllm"),
                 tmp_path_factory.mktemp("log") / "vllm-server.log", timeout_s=600, max_polls=6000) as proc:
        with httpx.Client(base_url=proc.url, timeout=120) as c:
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
