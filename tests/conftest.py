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
from pathlib import Path

import pytest

import _prefetch

SHARED_VLLM = "shared_vllm"  # the mark (_server_fixtures.SHARED_VLLM); registered in pyproject.toml
_running: list = []  # the SharedVllmServer while it runs
_last_user: list[pytest.Item] = []
_default_running: list = []  # the default model's ServerProcess while it runs
_last_default_user: list[pytest.Item] = []


def _talks_to_shared_vllm(item: pytest.Item) -> bool:
    return bool(item.get_closest_marker(SHARED_VLLM)) or "vllm_server" in getattr(item, "fixturenames", ())


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

    server = SharedVllmServer(vllm_setup, tmp_path_factory.mktemp("vllm-log"))
    _running.append(server)
    try:
        yield server.start()
    finally:
        server.stop()
        _running.remove(server)


@pytest.fixture(scope="session")
def default_server(tmp_path_factory):
    """The session's one `fsrl serve` on the default model and SAE with the shipped adapters, on
    the CPU (slow: a subprocess that loads the real model). Its users only read from it."""
    from fsrl.testing import ServerProcess

    adapters = Path(__file__).resolve().parents[1] / "adapters"
    proc = ServerProcess(["--adapters-dir", str(adapters), "--device", "cpu"],
                         log_path=tmp_path_factory.mktemp("default-server") / "server.log")
    _default_running.append(proc)
    try:
        proc.wait_ready(timeout_s=180, max_polls=1800)
        yield proc
    finally:
        proc.stop()
        _default_running.remove(proc)


def pytest_collection_finish(session: pytest.Session) -> None:
    users = [item for item in session.items if _talks_to_shared_vllm(item)]
    _last_user[:] = users[-1:]
    default_users = [item for item in session.items if "default_server" in getattr(item, "fixturenames", ())]
    _last_default_user[:] = default_users[-1:]
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
    for server in _running:
        if server.proc is not None:
            changed = server.put_back()
            if changed:
                pytest.fail(f"left the shared vLLM server changed ({', '.join(changed)}; put back)")


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if _last_user and item is _last_user[0]:
        for server in _running:
            server.stop()
    if _last_default_user and item is _last_default_user[0]:
        for proc in _default_running:
            proc.stop()
