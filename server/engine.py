"""The engine: continuous batching, off the event loop.

One worker thread (a `ModelThread`, server/model_thread.py) owns the model and a batch
(`Generator.batch()`, a `RunningBatch`). Between decode steps
it takes waiting jobs from the queue (as many as fit under `max_batch_rows`), prefills them
together, and from then on their rows decode in the same forward passes as every other
running row, each with its own adapter, scale, overrides, sampling, seed and stop conditions.
A row leaves the batch the step it finishes; a job whose listener went away leaves at the
next step. With device slots (`DeviceSlots`, `--adapter-slots`) a job joins only once its
adapter has a slot: it is paged onto the device between steps, and a job that must wait for a
slot holds back the jobs behind it (first come, first served).

Its face: `submit(job)` queues a job and gives its ticket, or refuses it at once with
`Overloaded` (503) when `max_pending` jobs are already admitted (waiting + running);
`stream(ticket)` is an async iterator of the job's token events (closing it early aborts the
job), `generate(ticket)` collects them into results. A
job stops counting the moment its generation ends, not when its client has read it all, so
slow readers hold no slot.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar
from contextlib import aclosing
from dataclasses import dataclass, field

import torch

from fsrl.generation import (DecodeBatch, EventsByRow, GenerationRequest, GenerationResult, Generator,
                             TokenEvent)
from server.errors import EngineStopped, GenerationFailed, Overloaded
from server.model_thread import ModelThread
from server.paging import SlotPager

log = logging.getLogger(__name__)
T = TypeVar("T")


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


def job_results(job: EngineJob, collected: EventsByRow) -> list[GenerationResult]:
    """Each row's events, put together as `Generator.generate` would."""
    first = (job.first_token - job.started) if job.first_token and job.started else None
    return collected.results(first_token_s=first)


@dataclass
class _Failed:
    error: BaseException


_END = object()


class Ticket:
    """A job between the worker thread and the coroutine listening to it."""

    def __init__(self, job: EngineJob, loop: asyncio.AbstractEventLoop, release: Callable[["Ticket"], None]):
        self.job, self.loop = job, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.abort = threading.Event()
        self.rows_left = len(job.requests)
        self.released = False  # no longer counted against the queue limit
        self.pinned: list[Any] = []  # the adapter versions it holds in device slots
        self._release = release

    def emit(self, item: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is gone: nobody is listening any more
            self.abort.set()

    def end(self, error: BaseException | None = None) -> None:
        """The job is over: its slot is free now, whether or not its client has read it all."""
        if self.job.finished is None:
            self.job.finished = time.perf_counter()
        self._release(self)  # first: whoever reads the end sees the slot free
        if error is not None:
            self.emit(_Failed(error))
        self.emit(_END)

    async def received(self) -> AsyncIterator[TokenEvent]:
        """The job's token events as they arrive, until its end; a failed job raises its error."""
        while (item := await self.events.get()) is not _END:
            if isinstance(item, _Failed):
                raise item.error
            yield item


async def collect_results(ticket: Ticket, events: AsyncIterator[TokenEvent]) -> list[GenerationResult]:
    """Every row's result from an engine's `stream(ticket)` (closed early if this is cancelled)."""
    collected = EventsByRow(ticket.job.requests)
    async with aclosing(events) as stream:
        async for event in stream:
            collected.add(event)
    return job_results(ticket.job, collected)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if not future.done():  # the caller may have given up (cancelled)
        future.set_exception(error) if error is not None else future.set_result(result)


class GenerationEngine:
    """What serving, the routes, the canary and /health use of an engine: fsrl's own (`Engine`)
    and vLLM's (`server.vllm_engine.VllmEngine`) both are one. Counters: `pending` (jobs admitted
    and not over), `running_rows`, `step_failures`, `failed_jobs`."""

    pending: int
    running_rows: int
    step_failures: int
    failed_jobs: int

    @property
    def alive(self) -> bool:
        raise NotImplementedError

    def check_capacity(self) -> None:
        """Raise (a 503) now rather than queue a job that cannot run."""
        raise NotImplementedError

    def submit(self, job: EngineJob) -> Ticket:
        """Queue the job now, on the event loop; read its events with `stream` or `generate`."""
        raise NotImplementedError

    def stream(self, ticket: Ticket) -> AsyncIterator[TokenEvent]:
        """The job's token events as they come; closing the iterator early aborts the job."""
        raise NotImplementedError

    async def generate(self, ticket: Ticket) -> list[GenerationResult]:
        """All rows of the job, once every row has finished. Cancelling aborts the job."""
        return await collect_results(ticket, self.stream(ticket))

    async def call_model(self, fn: Callable[[], T]) -> T:
        """Run `fn`, a forward of the host model, where no steering is set."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class DeviceSlots:
    """The default engine's device slots: a copy on the device of each host adapter a
    `SlotPager` seats, made on the model thread between steps. Requests name the registry's
    host adapters; a job that joins steers with the device copies. Every method but `copy_in`
    is called holding the engine's lock."""

    def __init__(self, slots: int, device: torch.device):
        self.pager: SlotPager = SlotPager(slots)
        self.device = device
        self.copies: dict[Any, Any] = {}  # host adapter -> its device copy (None until copied)

    def seat(self, ticket: "Ticket") -> bool:
        keys = list(dict.fromkeys(r.steering.adapter for r in ticket.job.requests if r.steering.adapter is not None))
        seating = self.pager.seat(keys)
        if seating is None:
            return False
        for key in seating.evict:
            self.copies.pop(key, None)
        for key in seating.page_in:
            self.copies[key] = None
        ticket.pinned = keys
        return True

    def copy_in(self, ticket: "Ticket", lock: threading.Condition) -> None:
        """Make the device copies the ticket still lacks (off the lock), then point its rows
        at them."""
        for key in ticket.pinned:
            with lock:
                present = self.copies.get(key)
            if present is None:
                made = copy.deepcopy(key).to(self.device)  # the host copy stays as it is
                with lock:
                    self.copies[key] = made
        with lock:
            on_device = {key: self.copies[key] for key in ticket.pinned}
        for request in ticket.job.requests:
            if request.steering.adapter is not None:
                request.steering = dataclasses.replace(request.steering, adapter=on_device[request.steering.adapter])

    def unpin(self, ticket: "Ticket") -> None:
        for key in self.pager.unpin(ticket.pinned):
            self.copies.pop(key, None)
        ticket.pinned = []

    def retire(self, key: Any) -> None:
        if self.pager.retire(key):
            self.copies.pop(key, None)


class Engine(GenerationEngine):
    """Runs `generator` on `model_thread`, the thread the model was loaded on; closing the
    engine closes the thread.

    One request can only fail itself: a row that cannot be sampled finishes alone with an
    error; after a step that raises, each job is retried alone (from its rows' host state),
    and only the jobs that fail alone are answered with an error. If the worker itself stops, every
    job waiting or running is answered and `alive` turns false (`/health` says 503)."""

    def __init__(self, generator: Generator, model_thread: ModelThread, max_pending: int = 64,
                 max_batch_rows: int = 16, observe_batch: Callable[[int], None] | None = None,
                 adapter_slots: int = 0):
        self.generator = generator
        self.slots = DeviceSlots(adapter_slots, generator.base.device) if adapter_slots else None
        self.max_pending = max_pending
        self.max_batch_rows = max_batch_rows
        self.observe_batch = observe_batch  # called with the rows of every forward pass
        self.pending = 0       # jobs admitted and not yet over: waiting + running
        self.running_rows = 0  # rows in the batch now
        self.step_failures = 0  # steps that raised (each followed by a recovery)
        self.failed_jobs = 0    # jobs answered with an error by the engine
        self.stopped_because: str | None = None  # why the worker died, if it did
        self._waiting: deque[Ticket] = deque()
        self._chores: deque[tuple[Callable[[], Any], asyncio.AbstractEventLoop, asyncio.Future]] = deque()
        self._active: list[Ticket] = []  # jobs with rows in the batch (worker thread only)
        self._wake = threading.Condition()
        self._closed = False
        self._thread = model_thread
        self._worker = self._thread.submit(self._run)

    @property
    def alive(self) -> bool:
        return self.stopped_because is None and not self._worker.done()

    def check_capacity(self) -> None:
        """Refuse now (503) rather than queue a job that cannot run; `serving.check` calls it
        before any work, `submit` again as it queues."""
        if self._closed:
            raise Overloaded("the server is shutting down")
        if not self.alive:
            raise EngineStopped("the generation engine has stopped; the server needs a restart")
        if self.pending >= self.max_pending:
            raise Overloaded(f"the queue is full ({self.pending} requests); retry shortly")

    def submit(self, job: EngineJob) -> Ticket:
        """Queue the job now (on the event loop), or refuse it with 503 while a response can
        still say so; read its events with `stream` or `generate`."""
        with self._wake:
            self.check_capacity()
            self.pending += 1
            ticket = Ticket(job, asyncio.get_running_loop(), self._release)
            self._waiting.append(ticket)
            self._wake.notify()
        return ticket

    def _release(self, ticket: Ticket) -> None:
        with self._wake:
            if not ticket.released:
                ticket.released = True
                self.pending -= 1
            if self.slots is not None and ticket.pinned:
                self.slots.unpin(ticket)
                self._wake.notify()  # a job waiting for a slot may fit now

    # The registry's side (`server.registry.AdapterCopies`): versions it starts and stops serving.

    async def add(self, adapter: Any, folder: str, weights_sha256_16: str | None) -> None:
        """Nothing to do: a version is copied onto the device when a job first needs it."""

    async def retire(self, adapter: Any) -> None:
        """A replaced or unloaded version leaves its slot now, or when its last job ends."""
        if self.slots is not None:
            with self._wake:
                self.slots.retire(adapter)

    def on_device(self, adapter: Any) -> bool:
        return self.slots is None or adapter in self.slots.pager

    async def stream(self, ticket: Ticket) -> AsyncIterator[TokenEvent]:
        """Token events of all rows as the worker produces them. Closing the iterator early
        (a client that went away) takes the job out of the queue at once, or its rows out of
        the batch at the next step."""
        try:
            async with aclosing(ticket.received()) as received:
                async for event in received:
                    yield event
        finally:
            ticket.abort.set()
            with self._wake:
                try:
                    self._waiting.remove(ticket)
                except ValueError:  # running (the worker drops it) or over
                    pass
                else:
                    ticket.end()
                self._wake.notify()

    async def call_model(self, fn: Callable[[], T]) -> T:
        """Run `fn` (a forward of the host model: feature activations, say) on the model
        thread between two decode steps, where no steering hook is set."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._wake:
            self.check_capacity()
            self._chores.append((fn, loop, future))
            self._wake.notify()
        return await future

    @staticmethod
    def _run_chores(chores: list) -> None:
        """Queued `call_model` functions, on the worker thread, between steps."""
        for fn, loop, future in chores:
            try:
                result, error = fn(), None
            except Exception as exc:  # the caller's failure, not the engine's
                result, error = None, exc
            loop.call_soon_threadsafe(_settle, future, result, error)

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

    def _take_waiting(self, running: DecodeBatch) -> list[Ticket]:
        """Waiting jobs that fit in the batch now, oldest first (called holding `_wake`)."""
        taken: list[Ticket] = []
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
            if self.slots is not None and not self.slots.seat(ticket):
                break  # its adapter waits for a slot that a running job holds
            taken.append(self._waiting.popleft())
            rows += size
        return taken

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # the worker is gone: answer everyone, say so on /health
            self.stopped_because = f"{type(exc).__name__}: {exc}"
            log.exception("the generation engine stopped")
            with self._wake:
                waiting, self._waiting = list(self._waiting), deque()
            for ticket in [*self._active, *waiting]:
                ticket.end(EngineStopped("the generation engine has stopped; the server needs a restart"))
            self._active = []
            self._refuse_chores(EngineStopped("the generation engine has stopped; the server needs a restart"))
            return
        with self._wake:
            waiting, self._waiting = list(self._waiting), deque()
        for ticket in [*self._active, *waiting]:
            ticket.end(Overloaded("the server is shutting down"))
        self._refuse_chores(Overloaded("the server is shutting down"))

    def _refuse_chores(self, error: BaseException) -> None:
        with self._wake:
            chores, self._chores = list(self._chores), deque()
        for _, loop, future in chores:
            loop.call_soon_threadsafe(_settle, future, None, error)

    def _loop(self) -> None:
        running = self.generator.batch()
        while True:
            with self._wake:
                while not self._closed and not running and not self._waiting and not self._chores:
                    self._wake.wait()
                if self._closed:
                    return
                chores = list(self._chores)
                self._chores.clear()
                joining = self._take_waiting(running)
            self._run_chores(chores)
            try:
                for ticket in [t for t in self._active if t.abort.is_set()]:
                    running.drop(ticket)
                    self._active.remove(ticket)
                    ticket.end()
                if joining and self.slots is not None:
                    for ticket in joining:
                        self.slots.copy_in(ticket, self._wake)
                if joining:
                    now = time.perf_counter()
                    for ticket in joining:
                        ticket.job.started = now
                    self._active += joining
                    requests = [r for t in joining for r in t.job.requests]
                    owners = [t for t in joining for _ in t.job.requests]
                    self._observe(len(requests))
                    events = running.add(requests, owners)
                    self.running_rows = len(running)  # before the events: a listener may look
                    self._dispatch(events, running)
                    joining = []
                if running:
                    self._observe(len(running))
                    events = running.step()
                    self.running_rows = len(running)
                    self._dispatch(events, running)
            except Exception:
                self.step_failures += 1
                log.exception("a generation step failed; retrying its %d job(s) one by one",
                              len(self._active))
                running = self._recover(running, joining)
            self.running_rows = len(running)

    def _recover(self, broken: DecodeBatch, joining: list[Ticket]
                 ) -> DecodeBatch:
        """After a failed step, whose batch may be half-written: each job runs alone for a
        prefill and a step, from its rows' host state, and a job that fails alone is answered
        with an error; the others go on together in a new batch."""
        jobs = []
        for ticket in self._active:
            if ticket.abort.is_set():
                ticket.end()
            elif ticket in joining:
                jobs.append((ticket, None))  # not in the batch yet: starts from its requests
            else:
                jobs.append((ticket, broken.rows_of(ticket)))
        self._active = [ticket for ticket, _ in jobs]
        survivors = []
        for ticket, rows in jobs:
            trial = self.generator.batch()  # raises only when the engine cannot go on
            try:
                if rows is None:
                    events = trial.add(ticket.job.requests, [ticket] * len(ticket.job.requests))
                else:
                    events = trial.resume(rows)
                self._dispatch(events, trial)
                if ticket in self._active and trial:
                    self._dispatch(trial.step(), trial)
            except Exception:
                log.exception("a job failed on its own; answering it with an error")
                self._fail(ticket, trial)
                continue
            if ticket in self._active:
                survivors.append((ticket, trial.rows_of(ticket)))
        running = self.generator.batch()
        for ticket, rows in survivors:
            try:
                self._dispatch(running.resume(rows), running)
            except Exception:
                log.exception("a job failed when its batch was rebuilt; answering it with an error")
                self._fail(ticket, running)
        return running

    def _fail(self, ticket: Ticket, running: DecodeBatch,
              error: BaseException | None = None) -> None:
        """Answer one job with an error and take its rows out of `running`."""
        self.failed_jobs += 1
        try:
            running.drop(ticket)
        finally:
            if ticket in self._active:
                self._active.remove(ticket)
            ticket.end(error or GenerationFailed("generation failed for this request; the server "
                                                 "and other requests are not affected"))

    def _observe(self, rows: int) -> None:
        if self.observe_batch is not None:
            self.observe_batch(rows)

    def _dispatch(self, events: list[tuple[Ticket, TokenEvent]], running: DecodeBatch) -> None:
        now = time.perf_counter()
        for ticket, event in events:
            if ticket not in self._active:  # failed by an earlier row's event of this step
                continue
            if event.error is not None:  # that row alone could not go on: the job fails
                self._fail(ticket, running, GenerationFailed(event.error))
                continue
            if ticket.job.first_token is None:
                ticket.job.first_token = now
            ticket.emit(event)
            if event.finished:
                ticket.rows_left -= 1
                if ticket.rows_left == 0:
                    self._active.remove(ticket)
                    ticket.end()
