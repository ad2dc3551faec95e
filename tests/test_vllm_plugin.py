"""Steering inside vLLM's compiled model (fsrl/vllm_plugin), token for token against fsrl's own
Generator (fp32, greedy). Each check runs `python -m fsrl.testing.vllm_check` in a process of its
own (vLLM starts processes, engine core and workers, that must not re-run the test module),
started in the background when the session begins (tests/_prefetch.py)."""

from __future__ import annotations

import importlib.util

import pytest

import _prefetch

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                 reason="vLLM is not installed (`make vllm`; `make test` installs it)")]


def _check(name: str) -> tuple[int, dict, str, str]:
    """The check's exit code, its JSON, the tail of its output (for messages) and its whole table
    (run in the background from the session's start: tests/_prefetch.py)."""
    done = _prefetch.result(name)
    return done.returncode, _prefetch.json_of(done, "check.json"), done.stdout[-4000:] + done.stderr[-4000:], done.stdout


def _assert_exact(result: dict, ranks: int, compiled: bool = True) -> None:
    for name, tokens in result["got"].items():
        assert tokens == result["ref"][name.split(" [")[0]], name
    assert len(result["counters"]) == ranks
    for counters in result["counters"]:  # compiled: the graph, not eager Python, steered every step
        assert counters["steps"] > 0
        assert counters["eager_site_forwards"] == 0 if compiled else counters["eager_site_forwards"] >= counters["steps"]


def test_compiled_steering_equals_fsrl_on_every_case():
    """Unsteered, two adapters (one loaded after compilation), clamps of every op, mixed rows in
    one batch, each alone, rows joining mid-generation: the same tokens as fsrl's Generator,
    and every steered case differs from its prompt's unsteered tokens."""
    code, result, log, _ = _check("compiled")
    assert code == 0, log
    assert result["failures"] == 0
    _assert_exact(result, ranks=1)


@pytest.fixture(scope="module")
def two_ranks():
    """The eager check on two ranks, then its batch again with steering dropped (one process)."""
    return _check("two ranks")


def test_the_check_fails_when_steering_silently_does_nothing(two_ranks):
    """The same comparison, on the same batch sent with every request unsteered, must fail on
    each steered case: it can tell steering that does nothing from steering that works."""
    code, result, log, _ = two_ranks
    silent = [line for line in result["dropped_table"] if "FAIL: silent" in line]
    assert len(silent) >= 6 and result["dropped_failures"] >= len(silent), log


def test_two_tensor_parallel_ranks_steer_like_one(two_ranks):
    """Eager on two ranks (the compiled graph is checked on one rank above, and on the shared
    server by every route test): the steering runs on both, every case token for token."""
    code, result, log, _ = two_ranks
    assert code == 0, log
    _assert_exact(result, ranks=2, compiled=False)


def test_default_model_with_the_shipped_adapters_equals_fsrl():
    # Eager: the real model's maths is the point here (67 of 110 s were its compile); the compiled
    # graph is checked on the tiny model above and by every route test on the shared vLLM server.
    code, result, log, _ = _check("default model")
    assert code == 0, log
    _assert_exact(result, ranks=1, compiled=False)


def test_the_vllm_bench_measures_every_mode_on_a_random_shape():
    """`make gpu-check`'s vLLM bench path on the CPU: a random Llama of the tiny shape written to a
    temporary folder, stock and steered vLLM and fsrl's engine in the same rounds, every mode
    measured (eager, for a fast start)."""
    done = _prefetch.result("vllm bench")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = _prefetch.json_of(done, "bench.json")
    assert report["setup"] == "random tiny + SAE 256, float32"
    modes = {(r["mode"], r["batch"]) for r in report["rows"] if r["tok_s"] > 0}
    for batch in (1, 4):
        for mode in ("vanilla", "steered, none", "adapter", "adapter+8",
                     "fsrl packed, none", "fsrl packed, adapter", "fsrl packed, adapter+8"):
            assert (mode, batch) in modes
    assert ("K=4 adapters", 4) in modes and ("K=4 adapters", 1) not in modes
