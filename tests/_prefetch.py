"""Slow checks that run in a process of their own (vLLM's exactness checks, its bench), started
in the background when the session's tests are collected, one after another, while the
in-process tests run; each test then waits for its check's result. The checks run at the
lowest CPU priority (`nice -n 19`, their vLLM processes too, in the tests' own session so that
the nice counts), so they take the cores only where the in-process tests leave them idle (a
server test waiting on its client, a single-threaded stretch) and never slow those tests down
much; a check still running when its test comes runs on alone.

`tests/conftest.py` starts the checks whose tests were selected (`start`) and stops whatever
is still running when the session ends (`stop`: each check's process group, by its id). A test
asks for its check with `result(name)`; a check not started in the background (its test run
alone, say) runs then, in the foreground. `FSRL_TEST_PREFETCH=0` turns the background off.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT_S = 900


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    folder: Path          # the check's own folder (its JSON, its setup)


@dataclass
class Check:
    cmd: list[str]
    env: dict[str, str] = field(default_factory=dict)
    tests: tuple[str, ...] = ()   # node ids (file::function) that read it
    prepare: Callable[[Path], None] | None = None  # writes what the command reads into its folder


def vllm_check(*flags: str, env: dict[str, str] | None = None, tests: tuple[str, ...] = ()) -> Check:
    return Check([sys.executable, "-m", "fsrl.testing.vllm_check", "--root", "{folder}/setup",
                  "--json", "{folder}/check.json", *flags], {"VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}, tests)


def _write_family_cases(folder: Path) -> None:
    importlib.import_module("test_vllm_families").write_cases(folder)


ENGINE = "tests/test_vllm_plugin.py::"
FAMILIES = "tests/test_vllm_families.py::"
CHECKS: dict[str, Check] = {
    "compiled": vllm_check(tests=(ENGINE + "test_compiled_steering_equals_fsrl_on_every_case",)),
    "two ranks": vllm_check("--tp", "2", "--eager", "--also-drop", env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"},
                            tests=(ENGINE + "test_the_check_fails_when_steering_silently_does_nothing",
                                   ENGINE + "test_two_tensor_parallel_ranks_steer_like_one")),
    "default model": vllm_check("--default", "--eager", "--adapters-dir", str(REPO / "adapters"),
                                tests=(ENGINE + "test_default_model_with_the_shipped_adapters_equals_fsrl",)),
    "vllm bench": Check([sys.executable, "-m", "fsrl.bench.vllm", "--random-shapes", "tiny", "--device", "cpu",
                         "--eager", "--batches", "1,4", "--new-tokens", "4", "--repeats", "1",
                         "--out", "{folder}/bench.json"],
                        tests=(ENGINE + "test_the_vllm_bench_measures_every_mode_on_a_random_shape",)),
    "vllm families": Check([sys.executable, "-m", "fsrl.testing.vllm_families", "{folder}/cases.json",
                            "{folder}/out.json"], {"VLLM_CPU_KVCACHE_SPACE": "1"},
                           (FAMILIES + "test_vllm_steers_each_family_exactly_at_the_saes_site",),
                           prepare=_write_family_cases),
}


class _Background:
    def __init__(self) -> None:
        self.results: dict[str, Finished] = {}
        self.done: dict[str, threading.Event] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.folders: list[Path] = []
        self.stopping = False
        self.thread: threading.Thread | None = None


_bg = _Background()


def _run(name: str) -> Finished:
    check = CHECKS[name]
    folder = Path(tempfile.mkdtemp(prefix=f"fsrl-check-{name.replace(' ', '-')}-"))
    _bg.folders.append(folder)
    if check.prepare is not None:
        check.prepare(folder)
    cmd = ["nice", "-n", "19", *(part.replace("{folder}", str(folder)) for part in check.cmd)]
    # Idle OpenMP threads sleep instead of spinning: a spinning thread at any priority still
    # takes a core from the tests' own torch threads, which wait for their slowest one.
    quiet = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
    # Its own process group (stopped by it) but the tests' session: Linux's autogroup scheduler
    # shares the CPU fairly between sessions whatever their nice, so a check in a session of its
    # own took half the cores from the tests (measured: the in-process tests ran at ~40 % of
    # their quiet speed while the checks ran). Python 3.10 lacks `process_group`: a session there.
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **quiet, **check.env}, **group)
    _bg.procs[name] = proc
    try:
        stdout, stderr = proc.communicate(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        _kill(proc)
        stdout, stderr = proc.communicate()
        stderr += f"\n(stopped after {LIMIT_S} s)"
    finally:
        _bg.procs.pop(name, None)
    return Finished(proc.returncode, stdout, stderr, folder)


def _kill(proc: subprocess.Popen) -> None:
    """The check and everything it started (vLLM's engine core and workers), by process group."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def start(selected_node_ids: list[str]) -> None:
    """Run, in one background thread, the checks some selected test reads."""
    if os.environ.get("FSRL_TEST_PREFETCH", "1") == "0":
        return
    wanted = [name for name, check in CHECKS.items()
              if any(node.split("[")[0] in check.tests for node in selected_node_ids)]
    if not wanted:
        return
    for name in wanted:
        _bg.done[name] = threading.Event()

    def work() -> None:
        for name in wanted:
            if _bg.stopping:
                break
            try:
                _bg.results[name] = _run(name)
            finally:
                _bg.done[name].set()

    _bg.thread = threading.Thread(target=work, name="fsrl-test-prefetch", daemon=True)
    _bg.thread.start()


def result(name: str) -> Finished:
    """The check's result: waited for when it runs in the background, else run now."""
    event = _bg.done.get(name)
    if event is not None:
        event.wait(timeout=2 * LIMIT_S)
        if name in _bg.results:
            return _bg.results[name]
    return _run(name)


def json_of(finished: Finished, file: str) -> dict:
    path = finished.folder / file
    return json.loads(path.read_text()) if path.exists() else {}


def stop() -> None:
    """At the session's end: stop what still runs, by process group, and remove the folders."""
    _bg.stopping = True
    for proc in list(_bg.procs.values()):
        _kill(proc)
    if _bg.thread is not None:
        _bg.thread.join(timeout=30)
    for folder in _bg.folders:
        shutil.rmtree(folder, ignore_errors=True)
