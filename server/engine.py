"""The engine: continuous batching, off the event loop.

One worker thread (a `ModelThread`) owns the model and a batch (`Generator.batch()`: a
`RunningBatch`, or a `StaticBatch` with --compile-decode). Between decode steps
it takes waiting jobs from the queue (as many as fit under `max_batch_rows`), prefills them
together, and from then on their rows decode in the same forward passes as every other
running row, each with its own adapter, scale, overrides, sampling, seed and stop conditions.
A row leaves the batch the step it finishes; a job whose listener went away leaves at the
next step.

Its face: `stream(job)` is an async iterator of the job's token events (closing it early
aborts the job), `generate(job)` collects them into results. When `max_pending` jobs are
already admitted (waiting + running), the next is refused at once with `Overloaded` (503).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fsrl.cpu_inference import ModelThread
from fsrl.generation import (GenerationRequest, GenerationResult, Generator, RunningBatch,
                             TokenEvent, results_from_events)
from server.errors import Overloaded

if TYPE_CHECKING:
    from fsrl.static_decode import StaticBatch

log = logging.getLogger(__name__)


@dataclass
class EngineJob:
    """The rows of one request (the steered row, plus the base row when comparing), and when
    the job was queued, joined the batch, produced its first token and finished."""

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


class _Ticket:
    """A job between the worker thread and the coroutine listening to it."""

    def __init__(self, job: EngineJob, loop: asyncio.AbstractEventLoop):
        self.job, self.loop = job, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.abort = threading.Event()
        self.rows_left = len(job.requests)

    def emit(self, item: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is gone: nobody is listening any more
            self.abort.set()

    def end(self, error: BaseException | None = None) -> None:
        if self.job.finished is None:
            self.job.finished = time.perf_counter()
        if error is not None:
            self.emit(_Failed(error))
        self.emit(_END)


class Engine:
    """Runs `generator` on `model_thread`, the thread the model was loaded on; closing the
    engine closes the thread."""

    def __init__(self, generator: Generator, model_thread: ModelThread, max_pending: int = 64,
                 max_batch_rows: int = 16, observe_batch: Callable[[int], None] | None = None):
        self.generator = generator
        self.max_pending = max_pending
        self.max_batch_rows = max_batch_rows
        self.observe_batch = observe_batch  # called with the rows of every forward pass
        self.pending = 0       # jobs admitted and not yet answered: waiting + running
        self.running_rows = 0  # rows in the batch now
        self._waiting: deque[_Ticket] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._thread = model_thread
        self._worker = self._thread.submit(self._run)

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
        (a client that went away) takes the job's rows out of the batch at the next step."""
        with self._admit():
            ticket = _Ticket(job, asyncio.get_running_loop())
            with self._wake:
                self._waiting.append(ticket)
                self._wake.notify()
            try:
                while (item := await ticket.events.get()) is not _END:
                    if isinstance(item, _Failed):
                        raise item.error
                    yield item
            finally:
                ticket.abort.set()
                with self._wake:
                    self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        try:
            self._worker.result(timeout=30)
        except TimeoutError:
            log.warning("the generation step did not end within 30 s of shutdown")
            return  # a step still running holds the model thread; leave it behind
        self._thread.close()

    # The worker thread.

    def _take_waiting(self, running: RunningBatch | StaticBatch) -> list[_Ticket]:
        """Waiting jobs that fit in the batch now, oldest first (called holding `_wake`)."""
        taken: list[_Ticket] = []
        if not running.can_join:
            return taken
        rows = len(running)
        while self._waiting:
            ticket = self._waiting[0]
            if ticket.abort.is_set():  # given up while it waited
                self._waiting.popleft().end()
                continue
            size = len(ticket.job.requests)
            if rows + size > self.max_batch_rows and rows > 0:
                break  # an oversized job still runs, alone
            taken.append(self._waiting.popleft())
            rows += size
        return taken

    def _run(self) -> None:
        running = self.generator.batch()
        active: list[_Ticket] = []
        while True:
            with self._wake:
                while not self._closed and not running and not self._waiting:
                    self._wake.wait()
                if self._closed:
                    break
                joining = self._take_waiting(running)
            for ticket in [t for t in active if t.abort.is_set()]:
                running.drop(ticket)
                active.remove(ticket)
                ticket.end()
            try:
                if joining:
                    now = time.perf_counter()
                    for ticket in joining:
                        ticket.job.started = now
                    active += joining
                    requests = [r for t in joining for r in t.job.requests]
                    owners = [t for t in joining for _ in t.job.requests]
                    self._observe(len(requests))
                    events = running.add(requests, owners)
                    self.running_rows = len(running)  # before the events: a listener may look
                    self._dispatch(events, active)
                if running:
                    self._observe(len(running))
                    events = running.step()
                    self.running_rows = len(running)
                    self._dispatch(events, active)
            except Exception as exc:  # the batch is lost, the server is not
                log.exception("generation step failed; failing its %d requests", len(active))
                for ticket in active:
                    ticket.end(exc)
                active = []
                running = self.generator.batch()
            self.running_rows = len(running)
        for ticket in [*active, *self._waiting]:
            ticket.end(Overloaded("the server is shutting down"))

    def _observe(self, rows: int) -> None:
        if self.observe_batch is not None:
            self.observe_batch(rows)

    def _dispatch(self, events: list[tuple[_Ticket, TokenEvent]], active: list[_Ticket]) -> None:
        now = time.perf_counter()
        for ticket, event in events:
            if ticket.job.first_token is None:
                ticket.job.first_token = now
            ticket.emit(event)
            if event.finished:
                ticket.rows_left -= 1
                if ticket.rows_left == 0:
                    active.remove(ticket)
                    ticket.end()
