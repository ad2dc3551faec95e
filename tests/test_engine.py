"""The engine on its own (no app, no HTTP): jobs submitted on an event loop, run by the worker
thread on a tiny model. A job answers as the generator alone would; each row leaves the batch
when it finishes and the job's slot frees with its last row; a full queue refuses at once; a
client that goes away takes its job out (from the queue at once, from the batch at the next
step); a job that fails does not fail another; a stopped or closed engine refuses new jobs."""

from __future__ import annotations

import asyncio
import time

import pytest

from server.model_thread import ModelThread
from fsrl.generation import GenerationRequest, Generator, SamplingParams
from fsrl.steering import RowSteering
from fsrl.testing import tiny_adapter, tiny_base, tiny_sae
from server.engine import Engine, EngineJob
from server.errors import EngineStopped, GenerationFailed, Overloaded

LAYER = 1
MARK = 7.0  # a steering scale that the injected fault recognises


@pytest.fixture(scope="module")
def generator() -> Generator:
    base = tiny_base()
    return Generator(base, tiny_sae(layer=LAYER), LAYER)


@pytest.fixture(scope="module")
def adapter(generator):
    return tiny_adapter(generator.sae, generator.base, layer=LAYER)


@pytest.fixture
def engine_of(generator):
    """Engines on the tiny generator, each on its own model thread; all closed afterwards."""
    engines = []

    def make(**kwargs) -> Engine:
        engines.append(Engine(generator, ModelThread(), **kwargs))
        return engines[-1]
    yield make
    for engine in engines:
        engine.close()


def request(generator, prompt: str = "hello there", n: int = 8, adapter=None, scale: float = 1.0,
            **sampling) -> GenerationRequest:
    ids = generator.base.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return GenerationRequest(ids, steering=RowSteering(adapter=adapter, scale=scale),
                             sampling=SamplingParams(max_new_tokens=n, ignore_eos=True, **sampling))


def wait_until(condition, limit_s: float = 30.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


async def wait_for(condition, limit_s: float = 30.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.002)


def test_a_job_answers_as_the_generator_alone_and_frees_its_slot(generator, adapter, engine_of):
    job_requests = [request(generator, n=10, adapter=adapter, scale=3.0), request(generator, n=10)]  # a compare
    want = generator.generate(job_requests)
    engine = engine_of()

    async def run():
        ticket = engine.submit(EngineJob(job_requests))
        assert engine.pending == 1
        return ticket, await engine.generate(ticket)
    ticket, got = asyncio.run(run())
    assert [(r.token_ids, r.text, r.finish_reason) for r in got] == \
        [(r.token_ids, r.text, r.finish_reason) for r in want]
    assert got[0].text != got[1].text  # the steered row is steered, the base row is not
    assert engine.pending == 0 and engine.running_rows == 0
    job = ticket.job
    assert job.submitted <= job.started <= job.first_token <= job.finished


def test_each_row_leaves_the_batch_the_step_it_finishes(generator, engine_of):
    sizes: list[int] = []
    engine = engine_of(observe_batch=sizes.append)

    async def run():
        return await engine.generate(engine.submit(EngineJob([request(generator, n=3), request(generator, n=50)])))
    short, long = asyncio.run(run())
    assert len(short.token_ids) == 3 and len(long.token_ids) == 50
    # The prefill gives both rows their first token; the short row's third comes at the second
    # step, and it leaves: 47 steps of one row follow.
    assert sizes == [2, 2, 2] + [1] * 47
    assert engine.pending == 0 and engine.running_rows == 0


def test_a_batch_holds_at_most_max_batch_rows_and_a_bigger_job_runs_alone(generator, engine_of):
    sizes: list[int] = []
    engine = engine_of(max_batch_rows=2, observe_batch=sizes.append)
    jobs = [[request(generator, f"job {i}", n=6)] for i in range(4)]
    jobs.append([request(generator, f"big {i}", n=6) for i in range(3)])
    want = [[r.token_ids for r in generator.generate(job)] for job in jobs]

    async def run():
        tickets = [engine.submit(EngineJob(job)) for job in jobs]
        return await asyncio.gather(*(engine.generate(t) for t in tickets))
    got = asyncio.run(run())
    assert [[r.token_ids for r in results] for results in got] == want
    # Never more than 2 rows, but for the three-row job: alone from its prefill to its end.
    start = sizes.index(3)
    assert sizes[start:start + 6] == [3] * 6
    assert all(size <= 2 for size in sizes[:start] + sizes[start + 6:])


def test_a_full_queue_refuses_at_once_and_admits_again_when_a_job_ends(generator, engine_of):
    engine = engine_of(max_pending=1)

    async def run():
        first = engine.submit(EngineJob([request(generator, n=5)]))
        with pytest.raises(Overloaded):
            engine.submit(EngineJob([request(generator, n=5)]))
        with pytest.raises(Overloaded):
            engine.check_capacity()
        assert engine.pending == 1
        await engine.generate(first)
        assert engine.pending == 0
        return await engine.generate(engine.submit(EngineJob([request(generator, n=5)])))
    (result,) = asyncio.run(run())
    assert len(result.token_ids) == 5


def test_closing_the_stream_takes_a_running_job_out_at_the_next_step(generator, engine_of):
    engine = engine_of()

    async def run():
        ticket = engine.submit(EngineJob([request(generator, n=400)]))
        events = engine.stream(ticket)
        first = await anext(events)
        await events.aclose()  # the client went away after one token
        await wait_for(lambda: engine.pending == 0 and engine.running_rows == 0)
        return ticket, first
    ticket, first = asyncio.run(run())
    assert first.row == 0 and not first.finished
    assert ticket.abort.is_set() and ticket.job.finished is not None
    assert ticket.events.qsize() < 200  # it stopped long before its 400 tokens


def test_a_job_given_up_while_it_waits_leaves_the_queue_at_once(generator, engine_of):
    engine = engine_of(max_batch_rows=1)

    async def run():
        running = engine.submit(EngineJob([request(generator, n=400)]))
        running_task = asyncio.create_task(engine.generate(running))
        await wait_for(lambda: engine.running_rows == 1)
        waiting = engine.submit(EngineJob([request(generator, n=5)]))
        waiting_task = asyncio.create_task(engine.generate(waiting))
        await asyncio.sleep(0.05)  # it waits: the batch is full
        assert engine.pending == 2 and waiting.job.started is None
        waiting_task.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await waiting_task
        assert engine.pending == 1 and waiting.job.started is None and waiting.job.finished is not None
        running_task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running_task
    asyncio.run(run())
    wait_until(lambda: engine.pending == 0 and engine.running_rows == 0)


def test_a_job_that_fails_does_not_fail_another(generator, adapter, engine_of, monkeypatch):
    ordinary = [request(generator, "the quick brown fox", n=200, adapter=adapter, temperature=0.8, seed=5)]
    alone = generator.generate(ordinary)[0].token_ids
    real = generator.forward

    def forward(input_ids, attention_mask, positions, cache, batch, *args, **kwargs):
        if batch.any_active and bool((batch.scale == MARK).any()) and input_ids.shape[1] == 1:
            raise RuntimeError("injected fault")  # any decode step with the marked row in it
        return real(input_ids, attention_mask, positions, cache, batch, *args, **kwargs)
    monkeypatch.setattr(generator, "forward", forward)
    engine = engine_of()

    async def run():
        good = asyncio.create_task(engine.generate(engine.submit(EngineJob(ordinary))))
        await wait_for(lambda: engine.running_rows == 1)
        bad = engine.submit(EngineJob([request(generator, "hi", n=20, adapter=adapter, scale=MARK)]))
        with pytest.raises(GenerationFailed):
            await engine.generate(bad)
        still_running = not good.done()
        return still_running, await good
    still_running, (result,) = asyncio.run(run())
    assert still_running  # the ordinary job was decoding when the bad one was answered
    assert result.token_ids == alone and result.finish_reason == "length"
    assert engine.step_failures >= 1 and engine.failed_jobs == 1 and engine.alive


def test_an_engine_whose_worker_stops_refuses_every_job():
    class Broken:
        def batch(self):
            raise RuntimeError("the device is gone")

    engine = Engine(Broken(), ModelThread())
    try:
        wait_until(lambda: not engine.alive)
        assert "the device is gone" in engine.stopped_because

        async def run():
            with pytest.raises(EngineStopped):
                engine.submit(EngineJob([]))
        asyncio.run(run())
        assert engine.pending == 0
    finally:
        engine.close()


def test_closing_the_engine_answers_its_jobs_and_refuses_new_ones(generator, engine_of):
    engine = engine_of(max_batch_rows=1)

    async def run():
        running = asyncio.create_task(engine.generate(engine.submit(EngineJob([request(generator, n=400)]))))
        await wait_for(lambda: engine.running_rows == 1)
        waiting = asyncio.create_task(engine.generate(engine.submit(EngineJob([request(generator, n=5)]))))
        await asyncio.to_thread(engine.close)
        for task in (running, waiting):
            with pytest.raises(Overloaded, match="shutting down"):
                await task
        with pytest.raises(Overloaded, match="shutting down"):
            engine.submit(EngineJob([request(generator, n=5)]))
        assert engine.pending == 0
    asyncio.run(run())
