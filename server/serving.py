"""A generation request's journey, between the HTTP edge and the engine.

`GenerateParams` is what a request asks for, already checked by the edge for everything that
needs no model (types, ranges, one op per index). `prepare` checks the rest against this
server (adapter known, feature index below d_sae, token caps), tokenises, and builds the rows:
the steered row, and with `compare` a base row with no adapter and no overrides, same sampling
and seed, in the same engine job. `run` and `stream` hand the job to the engine and collect a
`GenerationOutcome`. No HTTP or pydantic here; no torch either.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

from fsrl.errors import FsrlError
from fsrl.generation import EventsByRow, GenerationRequest, GenerationResult, TokenEvent
from fsrl.sampling import SamplingParams
from fsrl.steering import RowSteering
from server.engine import EngineJob, Ticket, job_results
from server.errors import InvalidField
from server.params import GenerateParams
from server.state import ServerState

@dataclass
class PreparedGeneration:
    id: str
    adapter_id: str | None
    seed: int
    prompt_tokens: int
    job: EngineJob
    return_features: int
    received: float = field(default_factory=time.perf_counter)
    prompt_ids: list[list[int]] = field(default_factory=list)  # each prompt's tokens
    n: int = 1
    compare: bool = False  # the last row is the base row
    echo: bool = False     # the prompt comes back with the completion
    echo_texts: list[str] = field(default_factory=list)  # with echo: each prompt as text
    ticket: Ticket | None = None  # the engine's, once queued


@dataclass
class GenerationOutcome:
    prepared: PreparedGeneration
    results: list[GenerationResult]  # every row: prompt by prompt, n each, then a compare's base
    queue_ms: float
    total_ms: float

    @property
    def steered(self) -> GenerationResult:
        return self.results[0]

    @property
    def base(self) -> GenerationResult | None:
        """The compare row (/generate with compare: true), the last."""
        return self.results[-1] if self.prepared.compare else None

    @property
    def completion_tokens(self) -> int:
        """Every token generated for the request, base row included (it cost as much)."""
        return sum(r.completion_tokens for r in self.results)


def _tokenize(tokenizer, text: str, field_name: str, special_tokens: bool = True) -> list[int]:
    try:
        ids = tokenizer(text, add_special_tokens=special_tokens)["input_ids"]
    except Exception as exc:  # text the tokenizer cannot take: this request's fault alone
        raise InvalidField(field_name, f"cannot be tokenised ({type(exc).__name__})") from None
    if not ids:
        raise InvalidField(field_name, "encodes to no tokens")
    return list(ids)


def encode_prompts(tokenizer, params: GenerateParams, vocab_size: int) -> tuple[list[list[int]], str]:
    """Every prompt's token ids, and the field they came from (for errors)."""
    if params.messages is not None:
        try:
            text = tokenizer.apply_chat_template(list(params.messages), add_generation_prompt=True,
                                                 tokenize=False)
        except Exception as exc:  # no template, or the template rejects the conversation
            raise InvalidField("messages", f"cannot apply the model's chat template: "
                                           f"{type(exc).__name__}: {str(exc)[:200]}") from None
        # The template already wrote any special tokens it wants.
        return [_tokenize(tokenizer, text, "messages", special_tokens=False)], "messages"
    if params.prompt is not None:
        return [_tokenize(tokenizer, params.prompt, "prompt")], "prompt"
    prompts = []
    for prompt in params.prompts:
        if isinstance(prompt, str):
            prompts.append(_tokenize(tokenizer, prompt, "prompt"))
            continue
        if not prompt or not all(0 <= t < vocab_size for t in prompt):
            raise InvalidField("prompt", f"token ids must be non-empty and in [0, {vocab_size})")
        prompts.append(list(prompt))  # as given: echo returns exactly these tokens
    return prompts, "prompt"


def _prompt_chars(params: GenerateParams) -> tuple[int, str]:
    if params.messages is not None:
        return sum(len(str(v)) for m in params.messages for v in m.values()), "messages"
    texts = [params.prompt] if params.prompt is not None else [p for p in params.prompts if isinstance(p, str)]
    return max((len(t) for t in texts), default=0), "prompt"


def check(state: ServerState, params: GenerateParams) -> None:
    """What can be refused at once, on the event loop, without tokenising: capacity, the
    adapter's name, a text too long to fit in the prompt limit whatever its tokens, and the
    rows a request may hold. (The overrides are checked against the SAE as the rows are built.)"""
    state.engine.check_capacity()
    if params.adapter is not None:
        state.registry.entry(params.adapter)  # 404 now; the copy onto the device comes later
    chars, field_name = _prompt_chars(params)
    limit = state.settings.max_prompt_tokens * state.max_chars_per_token
    if chars > limit:
        raise InvalidField(field_name, f"{chars} characters cannot fit in this server's "
                                       f"{state.settings.max_prompt_tokens} prompt tokens")
    rows = max(len(params.prompts), 1) * params.n + params.compare
    limit = max(state.settings.max_batch_rows, 2)  # a compare request always fits
    if rows > limit:
        raise InvalidField("n" if params.n > 1 else "prompt",
                           f"the request asks for {rows} rows (prompts x n); this server takes "
                           f"at most {limit} per request")


async def prepare(state: ServerState, params: GenerateParams, id_prefix: str = "gen") -> PreparedGeneration:
    """Check, then tokenise and build the rows on the server's preparation thread, so a long
    prompt or an adapter's copy onto the device never holds up the event loop."""
    received = time.perf_counter()
    check(state, params)
    prepared = await asyncio.get_running_loop().run_in_executor(
        state.prepare_thread, _build, state, params, id_prefix)
    prepared.received = received
    # Queued here, before any response starts: a full queue is a 503, never a stream's error.
    prepared.ticket = state.engine.submit(prepared.job)
    return prepared


def _checked(state: ServerState, steering: RowSteering) -> RowSteering:
    """The row's one check against the served SAE (index < d_sae and the contract's rules);
    the engine's batches do not check it again."""
    try:
        return steering.check(state.sae.d_sae)
    except FsrlError as exc:
        field_name, _, message = str(exc).partition(": ")
        if field_name not in ("features", "abort_when"):
            field_name, message = "features", str(exc)
        raise InvalidField(field_name, message) from exc


def _build(state: ServerState, params: GenerateParams, id_prefix: str) -> PreparedGeneration:
    adapter = state.registry.get(params.adapter) if params.adapter is not None else None
    prompts, field_name = encode_prompts(state.base.tokenizer, params, state.vocab_size)
    longest = max(len(p) for p in prompts)
    if longest > state.settings.max_prompt_tokens:
        raise InvalidField(field_name, f"{longest} tokens; this server takes at most "
                                       f"{state.settings.max_prompt_tokens}")

    cap = state.settings.max_new_tokens_cap
    room = (state.max_positions or longest + cap) - longest
    if params.max_new_tokens is None:
        max_new = min(cap, room)
    else:
        max_new = params.max_new_tokens
        if max_new > cap:
            raise InvalidField("max_new_tokens", f"must be at most {cap} (the server's cap), "
                                                 f"got {max_new}")
    if max_new > room or max_new < 1:
        raise InvalidField("max_new_tokens", f"the prompt has {longest} tokens and a "
                           f"request may hold {state.max_positions} in all: at most {max(room, 0)} "
                           f"new tokens fit, {max_new} asked")

    seed = params.seed if params.seed is not None else secrets.randbits(31)
    requests = []
    for prompt_ids in prompts:
        steering = _checked(state, RowSteering(
            adapter=adapter, scale=params.steering_scale, overrides=params.features,
            steer_from=len(prompt_ids) if params.steer_positions == "generated" else 0,
            abort_when=params.abort_when, generated_from=len(prompt_ids)))
        for j in range(params.n):
            sampling = SamplingParams(max_new_tokens=max_new, temperature=params.temperature,
                                      top_p=params.top_p, top_k=params.top_k, seed=(seed + j) % 2**63,
                                      stop=params.stop, ignore_eos=params.ignore_eos,
                                      presence_penalty=params.presence_penalty,
                                      frequency_penalty=params.frequency_penalty)
            requests.append(GenerationRequest(
                prompt_ids, steering, sampling, params.return_features, logprobs=params.logprobs,
                prompt_logprobs=params.logprobs if params.echo and params.logprobs is not None else None,
                telemetry=params.telemetry))
        if params.compare:
            for steered in requests[-params.n:]:  # the KL of each steered row is taken from the base row's
                steered.compare_with = len(requests)
            # Unsteered; `abort_when` is a stopping rule like `stop`, so it stops the base row too.
            base = RowSteering(abort_when=params.abort_when, generated_from=len(prompt_ids))
            requests.append(GenerationRequest(prompt_ids, base, requests[-1].sampling, 0))
    echo_texts = ([p if isinstance(p, str) else state.base.tokenizer.decode(list(p)) for p in params.prompts]
                  if params.echo else [])
    state.metrics.count_adapter_request(params.adapter)
    return PreparedGeneration(id=f"{id_prefix}-{uuid.uuid4().hex[:24]}", adapter_id=params.adapter,
                              seed=seed, prompt_tokens=sum(len(p) for p in prompts), job=EngineJob(requests),
                              return_features=params.return_features, prompt_ids=prompts, n=params.n,
                              compare=params.compare, echo=params.echo, echo_texts=echo_texts)


def _outcome(state: ServerState, prepared: PreparedGeneration,
             results: Sequence[GenerationResult]) -> GenerationOutcome:
    job = prepared.job
    metrics = state.metrics
    if job.first_token is not None:
        metrics.time_to_first_token.observe(job.first_token - prepared.received)
    for i, result in enumerate(results):
        row = "base" if prepared.compare and i == len(results) - 1 else "steered"
        metrics.generated_tokens.labels(output=row).inc(result.completion_tokens)
    return GenerationOutcome(prepared=prepared, results=list(results),
                             queue_ms=job.queue_s * 1000.0,
                             total_ms=(time.perf_counter() - prepared.received) * 1000.0)


async def run(state: ServerState, prepared: PreparedGeneration) -> GenerationOutcome:
    return _outcome(state, prepared, await state.engine.generate(prepared.ticket))


async def stream(state: ServerState, prepared: PreparedGeneration
                 ) -> AsyncIterator[TokenEvent | GenerationOutcome]:
    """Every token event as it comes, then the whole outcome."""
    collected = EventsByRow(prepared.job.requests)
    async with aclosing(state.engine.stream(prepared.ticket)) as events:  # closing it aborts the job
        async for event in events:
            yield collected.add(event)
    yield _outcome(state, prepared, job_results(prepared.job, collected))
