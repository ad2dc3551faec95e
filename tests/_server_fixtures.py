"""What the server's test files share: fixtures and helpers, imported by name (the project
keeps no conftest.py, and the tiny builders live in `fsrl.testing`).

Each test file that imports the fixtures gets its own tiny setup (`write_tiny_setup`) and:
- `client`: the app `fsrl serve` runs, in this process (FastAPI's TestClient runs its lifespan:
  model, SAE, adapters and engine load as in a real start), with the tiny server's settings;
- `app_factory`: more such apps on the same files with other settings (auth, limits);
- `openai_client`: the official openai client over `client`;
- `server`: a real `fsrl serve` process with the same settings (a subprocess: tests that use it
  are marked slow).
"""

from __future__ import annotations

import httpx
import pytest

from fsrl.testing import TinySetup, serving, tiny_server_args, write_tiny_setup

CAP = 400  # the tiny server's --max-new-tokens-cap
ERROR_KEYS = {"message", "type", "code"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> TinySetup:
    return write_tiny_setup(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def app_factory(setup):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import Settings

    def make(**settings) -> TestClient:
        # raise_server_exceptions=False: see the 500 a client sees, not the exception itself.
        return TestClient(create_app(Settings(
            model=str(setup.model_dir), sae=setup.sae_dir, adapters_dir=setup.adapters_dir,
            device="cpu", **settings)), raise_server_exceptions=False)
    return make


@pytest.fixture(scope="module")
def client(app_factory):
    """The tiny server, in-process: `--max-new-tokens-cap 400 --pack-cpu-weights`."""
    with app_factory(max_new_tokens_cap=CAP, pack_cpu_weights=True) as c:
        yield c


@pytest.fixture(scope="module")
def server(setup, tmp_path_factory):
    """The tiny server as a real `fsrl serve` process on loopback (slow: a subprocess)."""
    with serving(tiny_server_args(setup, "--max-new-tokens-cap", str(CAP), "--pack-cpu-weights"),
                 tmp_path_factory.mktemp("log") / "server.log") as proc:
        yield proc


@pytest.fixture(scope="module")
def openai_client(client):
    import openai
    # The TestClient is an httpx.Client: the openai client sends its requests through it.
    yield openai.OpenAI(base_url="http://testserver/v1", api_key="unused", max_retries=0, timeout=60,
                        http_client=client)


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
