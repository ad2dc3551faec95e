"""What is one per test session: the `fsrl serve --engine vllm` process that the route files
(their `vllm` cases) and tests/test_vllm_serving.py share (a SharedVllmServer of
tests/_server_fixtures.py, imported only when a test asks for it).

A test talks to it when it takes the `vllm_server` fixture, or carries the `shared_vllm` mark
(where a fixture takes the server only on some parameters: the route files' `engine`). After
each such test its adapters are put back as they were at its start, and a test that left them
changed errors; after the last such test of the session the process is stopped by its PID, so it
does not sit idle beside the rest of the suite.

Likewise one per session: the `fsrl serve` process on the embedded default model with the
shipped adapters (the `default_server` fixture), for the tests that need the real model behind
real HTTP and change nothing on it (they load, unload and replace no adapter); stopped by its PID
after the last test that takes it.

Also one per session: the background thread that runs the slow checks of
tests/test_vllm_plugin.py in processes of their own while the other tests run
(tests/_prefetch.py), started once the selected tests are known, stopped at the session's end.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import pytest

import _prefetch

SHARED_VLLM = "shared_vllm"  # the mark (_server_fixtures.SHARED_VLLM); registered in pyproject.toml


def _talks_to_shared_vllm(item: pytest.Item) -> bool:
    return bool(item.get_closest_marker(SHARED_VLLM)) or "vllm_server" in getattr(item, "fixturenames", ())


# The session's servers, by fixture: which tests use it, the server while it runs, and the last
# test that uses it (after which it is stopped).
_USES: dict[str, Callable[[pytest.Item], bool]] = {
    "vllm_server": _talks_to_shared_vllm,
    "default_server": lambda item: "default_server" in getattr(item, "fixturenames", ())}
_running: dict[str, list] = {name: [] for name in _USES}
_last_user: dict[str, pytest.Item] = {}


@contextmanager
def _running_as(name: str, server):
    """`server` counts as the running `name` server until it is stopped here."""
    _running[name].append(server)
    try:
        yield server
    finally:
        server.stop()
        _running[name].remove(server)


@pytest.fixture(scope="session")
def vllm_setup(tmp_path_factory):
    """The tiny setup `HIDDEN["vllm"]` wide (heads of 32, which vLLM's CPU attention takes)."""
    from _server_fixtures import HIDDEN
    from fsrl.testing import write_tiny_setup

    return write_tiny_setup(tmp_path_factory.mktemp("tiny-vllm"), hidden=HIDDEN["vllm"])


@pytest.fixture(scope="session")
def vllm_server(vllm_setup, tmp_path_factory):
    """The session's one `fsrl serve --engine vllm` on `vllm_setup`, with `client`'s token cap
    (slow: a subprocess)."""
    from _server_fixtures import SharedVllmServer

    with _running_as("vllm_server", SharedVllmServer(vllm_setup, tmp_path_factory.mktemp("vllm-log"))) as server:
        yield server.start()


@pytest.fixture(scope="session")
def default_server(tmp_path_factory):
    """The session's one `fsrl serve` on the default model and SAE with the shipped adapters, on
    the CPU (slow: a subprocess that loads the real model). Its users only read from it."""
    from fsrl.testing import ServerProcess

    adapters = Path(__file__).resolve().parents[1] / "adapters"
    with _running_as("default_server", ServerProcess(
            ["--adapters-dir", str(adapters), "--device", "cpu"],
            log_path=tmp_path_factory.mktemp("default-server") / "server.log")) as proc:
        proc.wait_ready(timeout_s=180, max_polls=1800)
        yield proc


def pytest_collection_finish(session: pytest.Session) -> None:
    for name, uses in _USES.items():
        users = [item for item in session.items if uses(item)]
        if users:
            _last_user[name] = users[-1]
    if importlib.util.find_spec("vllm") is not None and not session.config.option.collectonly:
        # (the checks' tests skip without vLLM)
        _prefetch.start([item.nodeid for item in session.items])


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _prefetch.stop()


@pytest.fixture(autouse=True)
def _shared_vllm_server_left_as_found(request):
    yield
    if not _talks_to_shared_vllm(request.node):
        return
    for server in _running["vllm_server"]:
        if server.proc is not None:
            changed = server.put_back()
            if changed:
                pytest.fail(f"left the shared vLLM server changed ({', '.join(changed)}; put back)")


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    for name, last in _last_user.items():
        if item is last:
            for server in _running[name]:
                server.stop()
