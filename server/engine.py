"""The engine: runs generation off the event loop.

Its face is what a batching engine will keep (STYLE.md habit 7): `stream(job)` is an async
iterator of the job's token events, and closing it early aborts the job at its next token;
`generate(job)` collects the same stream into results. Inside, for now, one worker thread runs
one job (one `Generator` batch: the steered row, plus the base row when comparing) at a time;
jobs wait in the executor's queue, and when `max_pending` jobs are already admitted the next
is refused at once with `Overloaded` (503) instead of hanging.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, field

from fsrl.generation import (GenerationRequest, GenerationResult, Generator, TokenEvent,
                             results_from_events)
from server.errors import Overloaded


@dataclass
class EngineJob:
    """The rows to generate together, and when the job was queued, started and finished."""

    requests: list[GenerationRequest]
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    first_token: float | None = None
    finished: float | None = None

    @property
    def queue_s(self) -> float:
        return (self.started or self.finished or time.perf_counter()) - self.submitted


def job_results(job: EngineJob, rows: Sequence[Sequence[TokenEvent]]) -> list[GenerationResult]:
    """Each row's events, put together as `Generator.generate` would."""
    first = (job.first_token - job.started) if job.first_token and job.started else None
    return results_from_events(job.requests, rows, first_token_s=first)


@dataclass
class _Failed:
    error: BaseException


_END = object()


class Engine:
    def __init__(self, generator: Generator, max_pending: int = 64):
        self.generator = generator
        self.max_pending = max_pending
        self.pending = 0  # jobs admitted and not yet answered: queued + running
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fsrl-engine")
        self._closed = False

    def check_capacity(self) -> None:
        """Refuse now (503) rather than queue a job that would be refused when it runs; a
        stream calls this before its response starts, while it can still send a status."""
        if self._closed:
            raise Overloaded("the server is shutting down")
        if self.pending >= self.max_pending:
            raise Overloaded(f"the queue is full ({self.pending} requests); retry shortly")

    @contextmanager
    def _admit(self) -> Iterator[None]:
        self.check_capacity()
        self.pending += 1
        try:
            yield
        finally:
            self.pending -= 1

    async def generate(self, job: EngineJob) -> list[GenerationResult]:
        """All rows of the job, once every row has finished. Cancelling aborts the job."""
        rows: list[list[TokenEvent]] = [[] for _ in job.requests]
        async with aclosing(self.stream(job)) as events:
            async for event in events:
                rows[event.row].append(event)
        return job_results(job, rows)

    async def stream(self, job: EngineJob) -> AsyncIterator[TokenEvent]:
        """Token events of all rows as the worker produces them. Closing the iterator early
        (a client that went away) stops the job at its next token."""
        with self._admit():
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()
            abort = threading.Event()

            def emit(item: object) -> None:
                try:
                    loop.call_soon_threadsafe(events.put_nowait, item)
                except RuntimeError:  # the loop is gone: nobody is listening any more
                    abort.set()

            def work() -> None:
                if abort.is_set():  # given up while it waited in the queue
                    return
                job.started = time.perf_counter()
                try:
                    for event in self.generator.stream(job.requests):
                        if abort.is_set():
                            break
                        if job.first_token is None:
                            job.first_token = time.perf_counter()
                        emit(event)
                except BaseException as exc:  # handed to the listener, who re-raises it
                    emit(_Failed(exc))
                finally:
                    job.finished = time.perf_counter()
                    emit(_END)

            loop.run_in_executor(self._executor, work)
            try:
                while (item := await events.get()) is not _END:
                    if isinstance(item, _Failed):
                        raise item.error
                    yield item
            finally:
                abort.set()

    def close(self) -> None:
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
