"""Shared by the load and fuzz scripts: a tiny random setup and a server process on loopback.

Both use the builders the tests use (`fsrl/testing/__init__.py`), so the scripts need no network and no
weights beyond what they make themselves.
"""

from __future__ import annotations

from pathlib import Path

from fsrl.testing import ServerProcess, TinySetup, read_sse, tiny_server_args, write_tiny_setup

__all__ = ["ServerProcess", "TinySetup", "read_sse", "write_tiny_setup", "start_tiny_server"]


def start_tiny_server(root: Path, *extra: str, hidden: int = 64) -> tuple[TinySetup, ServerProcess]:
    """Writes the tiny setup (`hidden` wide) under `root` and starts `fsrl serve` on it; the caller
    stops it."""
    setup = write_tiny_setup(root, hidden=hidden)
    server = ServerProcess(tiny_server_args(setup, *extra), log_path=root / "server.log")
    try:
        server.wait_ready(timeout_s=600, max_polls=6000)
    except BaseException:
        server.stop()
        raise
    return setup, server
