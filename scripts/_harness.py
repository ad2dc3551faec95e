"""Shared by the load and fuzz scripts: a tiny random setup and a server process on loopback.

Both reuse the test suite's builders (`tests/server_fixtures.py`), so the scripts need no
network and no weights beyond what they make themselves.
"""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

from server_fixtures import ServerProcess, TinySetup, read_sse, tiny_server_args, write_tiny_setup  # noqa: E402

__all__ = ["ServerProcess", "TinySetup", "read_sse", "write_tiny_setup", "start_tiny_server"]


def start_tiny_server(root: Path, *extra: str) -> tuple[TinySetup, ServerProcess]:
    """Writes the tiny setup under `root` and starts `fsrl serve` on it; the caller stops it."""
    setup = write_tiny_setup(root)
    server = ServerProcess(tiny_server_args(setup, *extra), log_path=root / "server.log")
    try:
        server.wait_ready(timeout_s=180)
    except BaseException:
        server.stop()
        raise
    return setup, server
