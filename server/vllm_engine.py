"""The engine on vLLM (`fsrl serve --engine vllm`): the face of `server/engine.py`'s `Engine`
(`check_capacity`, `submit`, `stream`, `generate`, `close`, `alive` and its counters) over
vLLM's `AsyncLLM`, run in this process, its engine core and workers in their own.

Every row of a job is one vLLM request. Its steering travels as `SamplingParams.extra_args`
(`fsrl.vllm_plugin.steering_extra_args`) and is applied inside vLLM's compiled model
(`fsrl/vllm_plugin/`); its tokens come back one step at a time and go through the same
`fsrl.generation.DecodeRow` the default engine uses, so detokenising, stop strings, EOS and
`max_new_tokens` behave the same on both engines. A row that ends on a stop string aborts its
vLLM request.

Adapters: each version the registry loads gets its own bank key (`id#n`) and a host copy on
every worker before the registry serves it. The model's bank has `--adapter-slots` slots; a job
is sent to vLLM once its version sits in one (paged in from the workers' host copies, least
recently used out, never one a running job holds: server/paging.py), and waits its turn
otherwise. A replaced or unloaded version is forgotten when the last request that started
with it ends, so a swap never changes a generation under way.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar

from fsrl.errors import FsrlError
from fsrl.generation import (DecodeRow, GenerationRequest, LogProbs,
                             TokenEvent)
from fsrl.overrides import MAX_RETURN_FEATURES
from fsrl.sampling import MIN_TEMPERATURE
from server.engine import EngineJob, GenerationEngine, Ticket
from server.errors import EngineStopped, GenerationFailed, Overloaded
from server.paging import SlotPager

log = logging.getLogger(__name__)
T = TypeVar("T")

# A row that steers nothing: its telemetry (the KL from a compare's base is the default engine's alone).
UNSTEERED_TELEMETRY = {"norm": 0.0, "pushed": 0, "kl": None, "conditions": []}


@dataclass(frozen=True)
class VllmOptions:
    model: str                  # a transformers folder
    sae_dir: str
    layer: int
    dtype: str                  # "float32", "bfloat16", ...
    max_model_len: int
    max_num_seqs: int
    bank_slots: int
    kv_cache_bytes: int         # what max_num_seqs requests of max_model_len tokens hold
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    seed: int = 0

    def engine_args(self) -> dict[str, Any]:
        from fsrl.vllm_plugin import steered_llm_kwargs

        return dict(model=self.model, dtype=self.dtype, enforce_eager=self.enforce_eager,
                    max_model_len=self.max_model_len, max_num_seqs=self.max_num_seqs,
                    max_num_batched_tokens=max(2048, self.max_model_len), seed=self.seed,
                    tensor_parallel_size=self.tensor_parallel_size,
                    distributed_executor_backend="mp" if self.tensor_parallel_size > 1 else None,
                    disable_log_stats=True, kv_cache_memory_bytes=self.kv_cache_bytes,
                    **{**steered_llm_kwargs(self.model, self.sae_dir, self.layer, bank_slots=self.bank_slots,
                                            table_rows=self.max_num_seqs, capture_top=MAX_RETURN_FEATURES),
                       # Safe here: every steered request's prompt carries its steering as cache salt.
                       "enable_prefix_caching": True})


def start_async_llm(options: VllmOptions):
    """vLLM's AsyncLLM with the steered model; call on the event loop that will use it."""
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # this process runs threads
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(AsyncEngineArgs(**options.engine_args()))


class BankKeys:
    """Which adapter version sits under which bank key, which are in the model's bank, and how
    many jobs use each. A key is loaded into every worker's host memory before the registry
    serves the version; `acquire` seats a job's keys in the bank (in the order jobs come),
    `release` lets them go; a retired key (replaced or unloaded) is forgotten on the workers
    when its last job ends. One lock orders the bank's bookkeeping and its page calls, so the
    workers see evictions before the page-ins that need their slots."""

    def __init__(self, llm, slots: int):
        self.llm = llm
        self.pager: SlotPager[str] = SlotPager(slots)
        # id(adapter object) -> (the object, kept alive so its id stays its own; its key), from
        # the load until the key is forgotten.
        self._key_of: dict[int, tuple[Any, str]] = {}
        self._users: dict[str, int] = {}        # key -> jobs submitted with it and not over
        self._retired: set[str] = set()
        self._count = itertools.count(1)
        self._turn = asyncio.Condition()
        self._line: list[object] = []           # jobs waiting to be seated, oldest first
        self.waits = 0                          # jobs that had to wait for a slot

    def key(self, adapter: Any) -> str:
        """The bank key of this adapter object: the version a request resolved keeps serving
        it until it ends, even when it was replaced meanwhile (as on the default engine)."""
        found = self._key_of.get(id(adapter))
        if found is None:  # replaced, and its last request ended, between resolving and queueing
            raise Overloaded(f"adapter {adapter.id!r} was replaced or unloaded while this request "
                             "was prepared; retry")
        return found[1]

    def on_device(self, adapter: Any) -> bool:
        found = self._key_of.get(id(adapter))
        return found is not None and found[1] in self.pager

    async def add(self, adapter: Any, folder: str, weights_sha256_16: str | None) -> str:
        key = f"{adapter.id}#{next(self._count)}"
        try:
            await self.llm.collective_rpc("fsrl_load_adapter", args=(key, folder, weights_sha256_16))
        except Exception as exc:
            raise FsrlError(f"the vLLM workers could not load adapter {adapter.id!r}: {exc}") from exc
        self._users[key] = 0
        self._key_of[id(adapter)] = (adapter, key)
        return key

    async def retire(self, adapter: Any) -> None:
        found = self._key_of.get(id(adapter))
        if found is not None:
            self._retired.add(found[1])
            await self._forget_if_unused(found[1])

    def hold(self, key: str) -> None:
        """A job was submitted with `key` (on the event loop, before any swap can retire it)."""
        self._users[key] += 1

    async def acquire(self, keys: list[str]) -> None:
        """Wait for this job's turn and for slots for `keys`, then page them in."""
        if not keys:
            return
        me = object()
        async with self._turn:
            self._line.append(me)
            try:
                waited = False
                while True:
                    seating = self.pager.seat(keys) if self._line[0] is me else None
                    if seating is not None:
                        break
                    waited = True
                    await self._turn.wait()
                self.waits += waited
                if seating.evict or seating.page_in:
                    try:
                        await self.llm.collective_rpc("fsrl_page", args=(seating.evict, seating.page_in))
                    except BaseException as exc:  # cancelled too: the job gives its slots back
                        self.pager.unpin(keys)
                        for key in seating.page_in:  # where the workers left them is unknown now
                            self.pager.retire(key)
                        if not isinstance(exc, Exception):
                            raise
                        raise GenerationFailed("the vLLM workers could not page this request's adapter "
                                               "into the bank") from exc
            finally:
                self._line.remove(me)
                self._turn.notify_all()

    async def release(self, keys: list[str], seated: bool) -> None:
        """A job with `keys` ended (`seated`: it got its slots)."""
        async with self._turn:
            if seated:
                self.pager.unpin(keys)
            for key in keys:
                self._users[key] -= 1
            self._turn.notify_all()
        for key in dict.fromkeys(keys):
            await self._forget_if_unused(key)

    async def _forget_if_unused(self, key: str) -> None:
        async with self._turn:
            if key not in self._retired or self._users.get(key) != 0:
                return
            self._retired.discard(key)
            del self._users[key]
            self.pager.retire(key)  # unpinned: it leaves its slot now, if it had one
            self._key_of = {i: held for i, held in self._key_of.items() if held[1] != key}
            try:
                await self.llm.collective_rpc("fsrl_unload_adapter", args=(key,))
            except Exception:  # its host copy and slot stay taken; serving goes on
                log.exception("could not forget adapter %s on the vLLM workers", key)
            self._turn.notify_all()


def _logprobs(entry: dict | None, token: int, top: int) -> LogProbs | None:
    """vLLM's {token: Logprob} of one position as fsrl's (log-probability, top k)."""
    if entry is None:
        return None
    chosen = entry.get(token)
    ranked = sorted(((t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= top),
                    key=lambda item: item[1].rank)
    return (chosen.logprob if chosen is not None else float("nan"),
            [(int(t), float(lp.logprob)) for t, lp in ranked[:top]])


class VllmEngine(GenerationEngine):
    """See the module's docstring. Built by `server.state` on the event loop it serves."""

    def __init__(self, llm, tokenizer, eos_ids: set[int], bank: BankKeys, max_pending: int = 64,
                 observe_batch: Callable[[int], None] | None = None):
        self.llm, self.tokenizer, self.eos_ids, self.bank = llm, tokenizer, eos_ids, bank
        self.max_pending = max_pending
        self.observe_batch = observe_batch
        self.pending = 0
        self.running_rows = 0
        self.step_failures = 0
        self.failed_jobs = 0
        self.stopped_because: str | None = None
        self._closed = False
        self._tasks: dict[Ticket, asyncio.Task] = {}
        self._host_model = ThreadPoolExecutor(1, thread_name_prefix="fsrl-host-model")
        self._ids = itertools.count()

    @property
    def alive(self) -> bool:
        return not self._closed and not self.llm.errored

    def check_capacity(self) -> None:
        if self._closed:
            raise Overloaded("the server is shutting down")
        if not self.alive:
            raise EngineStopped("the generation engine has stopped; the server needs a restart")
        if self.pending >= self.max_pending:
            raise Overloaded(f"the queue is full ({self.pending} requests); retry shortly")

    def submit(self, job: EngineJob) -> Ticket:
        self.check_capacity()
        # The bank keys are taken now, on the event loop: a swap after this line cannot change them.
        keys = [self.bank.key(r.steering.adapter) if r.steering.adapter is not None else None
                for r in job.requests]
        for key in keys:
            if key is not None:
                self.bank.hold(key)
        self.pending += 1
        ticket = Ticket(job, asyncio.get_running_loop(), self._release)
        self._tasks[ticket] = asyncio.get_running_loop().create_task(self._run(ticket, keys))
        return ticket

    def _release(self, ticket: Ticket) -> None:
        if not ticket.released:
            ticket.released = True
            self.pending -= 1

    async def stream(self, ticket: Ticket) -> AsyncIterator[TokenEvent]:
        """As `Engine.stream`: closing early aborts the job's vLLM requests."""
        try:
            async with aclosing(ticket.received()) as received:
                async for event in received:
                    yield event
        finally:
            task = self._tasks.get(ticket)
            if task is not None and not task.done():
                task.cancel()

    async def _run(self, ticket: Ticket, keys: list[str | None]) -> None:
        job = ticket.job
        used = [key for key in keys if key is not None]
        seated = False
        rows: list[asyncio.Task] = []
        error: BaseException | None = None
        try:
            await self.bank.acquire(used)  # waits while the bank's slots are held by running jobs
            seated = True
            job.started = time.perf_counter()
            rows = [asyncio.create_task(self._row(ticket, i, request, key))
                    for i, (request, key) in enumerate(zip(job.requests, keys))]
            await asyncio.gather(*rows)
        except asyncio.CancelledError:
            for row in rows:
                row.cancel()
            await asyncio.gather(*rows, return_exceptions=True)
        except Exception as exc:
            for row in rows:
                row.cancel()
            await asyncio.gather(*rows, return_exceptions=True)
            self.failed_jobs += 1
            log.exception("a vLLM request failed; answering its job with an error")
            error = exc if isinstance(exc, (GenerationFailed, EngineStopped)) else GenerationFailed(
                "generation failed for this request; the server and other requests are not affected")
        finally:
            await self.bank.release(used, seated)
            self._tasks.pop(ticket, None)
            ticket.end(error)

    async def _row(self, ticket: Ticket, index: int, request: GenerationRequest, key: str | None) -> None:
        from vllm import SamplingParams as VllmSampling
        from vllm.sampling_params import RequestOutputKind

        from fsrl.vllm_plugin import steering_extra_args

        row = DecodeRow(request, self.tokenizer, self.eos_ids, owner=ticket, local=index)
        s, sampling = request.steering, request.sampling
        request_id = f"fsrl-{next(self._ids)}"
        # An unsteered row's features are empty lists and its telemetry zeros; a steered row's
        # come from the workers.
        fetch_features = (bool(request.return_features) or request.telemetry) and not s.is_noop
        steering = dict(adapter=key, scale=s.scale, overrides=s.overrides, steer_from=s.steer_from,
                        abort_when=s.abort_when, generated_from=s.generated_from)
        greedy = sampling.temperature < MIN_TEMPERATURE
        params = VllmSampling(
            max_tokens=sampling.max_new_tokens, temperature=0.0 if greedy else sampling.temperature,
            top_p=sampling.top_p, top_k=sampling.top_k if sampling.top_k > 0 else -1,
            presence_penalty=sampling.presence_penalty, frequency_penalty=sampling.frequency_penalty,
            seed=None if greedy else int(sampling.seed) % 2**63,
            # EOS as DecodeRow sees it: its ids stop vLLM too, and nothing else does.
            ignore_eos=True, stop_token_ids=sorted(row.eos_ids), detokenize=False,
            logprobs=request.logprobs, prompt_logprobs=request.prompt_logprobs,
            output_kind=RequestOutputKind.DELTA,
            extra_args=None if s.is_noop else steering_extra_args(
                **steering, return_features=request.return_features if fetch_features else 0,
                telemetry=request.telemetry, key=request_id))
        prompt: dict[str, Any] = {"prompt_token_ids": list(request.prompt_ids)}
        if not s.is_noop:
            # The prefix cache keys blocks by tokens and salt: a steered request reuses only
            # blocks computed under the same steering (adapter version, scale, clamps, start).
            prompt["cache_salt"] = json.dumps(steering_extra_args(**steering), sort_keys=True)
        captures: list[dict] = []  # taken from the workers, not yet sent
        self.running_rows += 1
        try:
            first = True
            async with aclosing(self.llm.generate(prompt, params, request_id)) as outputs:
                async for out in outputs:
                    completion = out.outputs[0]
                    if fetch_features and completion.token_ids:
                        captures += await self._take_features(request_id)
                    # Read before this output's tokens: the forward that sampled them has run, so
                    # a condition that passed on an earlier token is known, and its row keeps
                    # exactly the tokens the default engine's would.
                    fired = await self._take_fired(request_id) if s.abort_when else None
                    prompt_logprobs = None
                    if first and request.prompt_logprobs is not None and out.prompt_logprobs is not None:
                        prompt_logprobs = [_logprobs(entry, token, request.prompt_logprobs)
                                           for entry, token in zip(out.prompt_logprobs[1:], request.prompt_ids[1:])]
                    for j, token in enumerate(completion.token_ids):
                        if fired is not None and len(row.token_ids) >= fired[1]:
                            break
                        logprobs = (_logprobs(completion.logprobs[j], token, request.logprobs)
                                    if request.logprobs is not None and completion.logprobs else None)
                        captured = captures.pop(0) if captures else {}
                        feats = (captured.get("features") or []) if request.return_features else None
                        telemetry = (captured.get("telemetry") or dict(UNSTEERED_TELEMETRY)) if request.telemetry else None
                        delta = row.push(int(token), feats)
                        done = row.finish_reason is not None
                        if ticket.job.first_token is None:
                            ticket.job.first_token = time.perf_counter()
                        ticket.emit(TokenEvent(index, int(token), delta, done, row.finish_reason, feats,
                                               text=row.text if done else None, logprobs=logprobs,
                                               prompt_logprobs=prompt_logprobs if first else None,
                                               telemetry=telemetry))
                        first = False
                        if done:
                            return  # leaving the loop aborts the vLLM request (a stop string)
                    if fired is not None:
                        ticket.emit(row.stop_on_feature(fired[0]))
                        return  # leaving the loop aborts the vLLM request
            raise GenerationFailed("the vLLM engine ended this request before it finished")
        finally:
            self.running_rows -= 1
            try:  # what steps after the last read kept (a stop string, an abort)
                if fetch_features:
                    await self._take_features(request_id)
                if s.abort_when:
                    await self._take_fired(request_id)
            except Exception:
                log.exception("could not clear what the workers kept for %s", request_id)

    async def _take_features(self, key: str) -> list[dict]:
        """What the workers kept for `key` since the last take, per token (every rank keeps the
        same: the steering runs on each; rank 0's are read)."""
        per_rank = await self.llm.collective_rpc("fsrl_take_features", args=(key,))
        return [{"features": [(int(i), float(d)) for i, d in token["features"]] if token["features"] is not None else None,
                 "telemetry": token["telemetry"]} for token in per_rank[0]]

    async def call_model(self, fn: Callable[[], T]) -> T:
        """Run `fn` (a forward of the host model, which vLLM does not use) off the event loop,
        one at a time (hooks on the host model are per forward, not per thread)."""
        self.check_capacity()
        return await asyncio.get_running_loop().run_in_executor(self._host_model, fn)

    async def _take_fired(self, key: str) -> tuple[int, int] | None:
        """(feature, generated tokens to keep) once an `abort_when` condition of `key` passed."""
        fired = (await self.llm.collective_rpc("fsrl_take_fired", args=(key,)))[0]
        return (int(fired[0]), int(fired[1])) if fired is not None else None

    def close(self) -> None:
        self._closed = True
        self._host_model.shutdown(wait=False, cancel_futures=True)
        for task in list(self._tasks.values()):
            task.cancel()
        try:
            self.llm.shutdown()
        except Exception:
            log.exception("vLLM did not shut down cleanly")
