"""Faults injected into the engine of a served app (uvicorn in a test thread): an unexpected
error is a 500 in the error shape (also in the middle of a stream) and the server stays up; a step that raises
because of one row fails that row's request alone; a worker that dies turns /health to 503 and
answers everyone."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from fsrl.testing import read_sse

import _server_fixtures as fixtures
from _server_fixtures import assert_error

# Fixtures the server's test files share: pytest finds them by these names.
setup, app_factory = fixtures.setup, fixtures.app_factory

ORDINARY = {"prompt": "the quick brown fox", "adapter": "tiny", "max_new_tokens": 120,
            "ignore_eos": True, "temperature": 0.8, "seed": 5}
MARK = 7.0  # a steering scale that the injected fault recognises


def fail_forward_after(generator, calls: int) -> Callable[[], None]:
    """Make the model's forward raise after `calls` good calls; returns the undo."""
    real, count = generator.forward, itertools.count()

    def forward(*args, **kwargs):
        if next(count) >= calls:
            raise RuntimeError("secret internals")
        return real(*args, **kwargs)
    generator.forward = forward
    return lambda: setattr(generator, "forward", real)


def test_unexpected_error_is_a_500_in_the_error_shape_and_the_server_stays_up(app_factory):
    with app_factory() as c:
        undo = fail_forward_after(c.app_state["fsrl"].engine.generator, 0)
        r = c.post("/generate", json={"prompt": "hi"})
        error = assert_error(r, 500)
        assert "secret" not in r.text and "Traceback" not in r.text and error["type"] == "server_error"
        assert c.get("/health").status_code == 200
        undo()  # the engine survived the failed batch and serves the next request
        assert c.post("/generate", json={"prompt": "hi", "max_new_tokens": 3}).status_code == 200


def test_failure_mid_stream_ends_the_stream_with_an_error_event_and_done(app_factory):
    with app_factory() as c:
        fail_forward_after(c.app_state["fsrl"].engine.generator, 1)  # prefill works, decoding fails
        with c.stream("POST", "/generate", json={"prompt": "hi", "stream": True, "ignore_eos": True}) as r:
            assert r.status_code == 200
            events, done = read_sse(r)
        assert done and events[0]["type"] == "token" and events[-1]["error"]["type"] == "server_error"
        assert "secret" not in json.dumps(events)


def fail_marked_rows(generator, when: str) -> None:
    """The model's forward raises whenever a row steered with scale MARK is in it: at
    `prefill` (more than one input position) or at `decode` (one)."""
    real = generator.forward

    def forward(input_ids, attention_mask, positions, cache, batch, *args, **kwargs):
        marked = bool((batch.scale == MARK).any()) if batch.any_active else False
        at_prefill = input_ids.shape[1] > 1
        if marked and at_prefill == (when == "prefill"):
            raise RuntimeError("injected fault: /secret/path")
        return real(input_ids, attention_mask, positions, cache, batch, *args, **kwargs)
    generator.forward = forward


def wait_for_rows(engine, rows: int, limit_s: float = 30.0) -> None:
    deadline = time.monotonic() + limit_s
    while engine.running_rows < rows:
        assert time.monotonic() < deadline, "the ordinary request never started decoding"
        time.sleep(0.005)


@pytest.mark.parametrize("when", ["prefill", "decode"])
def test_a_step_that_fails_for_one_row_fails_that_request_alone(app_factory, when):
    with app_factory() as c:
        alone = c.post("/generate", json=ORDINARY).json()["steered"]["text"]
        engine = c.app_state["fsrl"].engine
        fail_marked_rows(engine.generator, when)
        with ThreadPoolExecutor(2) as pool:
            ordinary = pool.submit(c.post, "/generate", json=ORDINARY)
            wait_for_rows(engine, 1)
            bad = c.post("/generate", json={"prompt": "hi", "steering_scale": MARK, "adapter": "tiny",
                                            "max_new_tokens": 20, "ignore_eos": True})
            running_when_bad_answered = engine.running_rows
            ordinary = ordinary.result(timeout=60)
        assert bad.status_code == 500, bad.text
        error = bad.json()["error"]
        assert error["code"] == "generation_failed" and "secret" not in bad.text
        assert running_when_bad_answered >= 1  # the ordinary request was still decoding
        assert ordinary.status_code == 200 and ordinary.json()["steered"]["text"] == alone
        assert engine.step_failures >= 1 and engine.failed_jobs == 1
        metrics = c.get("/metrics").text
        assert "fsrl_failed_requests_total 1.0" in metrics and "fsrl_step_failures_total 0.0" not in metrics
        assert c.get("/health").status_code == 200


def test_a_worker_that_dies_answers_everyone_and_turns_health_to_503(app_factory):
    with app_factory() as c:
        generator = c.app_state["fsrl"].engine.generator

        def broken(*args, **kwargs):
            raise RuntimeError("the device is gone")
        # The step fails, and the recovery cannot make a new batch: the worker cannot go on.
        generator.forward = generator.batch = broken
        answer = c.post("/generate", json=ORDINARY)
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "engine_stopped"
        health = c.get("/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == "engine_stopped"
        assert "device is gone" not in health.text
        after = c.post("/generate", json={"prompt": "hi"})
        assert after.status_code == 503 and after.json()["error"]["code"] == "engine_stopped"
        assert "fsrl_engine_up 0.0" in c.get("/metrics").text
