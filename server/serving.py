"""A generation request's journey, between the HTTP edge and the engine.

`GenerateParams` is what a request asks for, already checked by the edge for everything that
needs no model (types, ranges, one op per index). `prepare` checks the rest against this
server (adapter known, feature index below d_sae, token caps), tokenises, and builds the rows:
the steered row, and with `compare` a base row with no adapter and no overrides, same sampling
and seed, in the same engine job. `run` and `stream` hand the job to the engine and collect a
`GenerationOutcome`. No HTTP or pydantic here; no torch either.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from fsrl.errors import FsrlError
from fsrl.generation import GenerationRequest, GenerationResult, SamplingParams, TokenEvent
from fsrl.steering import FeatureOverride, RowSteering, validate_overrides
from server.engine import EngineJob, job_results
from server.errors import InvalidField
from server.state import ServerState

ROWS = ("steered", "base")  # row 0 of a job is the steered output, row 1 (compare) the base


@dataclass(frozen=True)
class GenerateParams:
    prompt: str | None = None
    messages: tuple[dict[str, Any], ...] | None = None
    adapter: str | None = None
    steering_scale: float = 1.0
    features: tuple[FeatureOverride, ...] = ()
    steer_positions: str = "all"          # "all" | "generated"
    max_new_tokens: int | None = 64       # None: as many as fit, up to the server's cap
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None               # None: the server picks one and reports it
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    compare: bool = False
    return_features: int = 0


@dataclass
class PreparedGeneration:
    id: str
    adapter_id: str | None
    seed: int
    prompt_tokens: int
    job: EngineJob
    return_features: int
    received: float = field(default_factory=time.perf_counter)


@dataclass
class GenerationOutcome:
    prepared: PreparedGeneration
    steered: GenerationResult
    base: GenerationResult | None
    queue_ms: float
    total_ms: float

    @property
    def completion_tokens(self) -> int:
        """Every token generated for the request, base row included (it cost as much)."""
        return self.steered.completion_tokens + (self.base.completion_tokens if self.base else 0)


def encode_prompt(tokenizer, params: GenerateParams) -> list[int]:
    if params.messages is not None:
        try:
            text = tokenizer.apply_chat_template(list(params.messages), add_generation_prompt=True,
                                                 tokenize=False)
        except Exception as exc:  # no template, or the template rejects the conversation
            raise InvalidField("messages", f"cannot apply the model's chat template: {exc}") from exc
        # The template already wrote any special tokens it wants.
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        field_name = "messages"
    else:
        ids = tokenizer(params.prompt)["input_ids"]
        field_name = "prompt"
    if not ids:
        raise InvalidField(field_name, "encodes to no tokens")
    return list(ids)


def prepare(state: ServerState, params: GenerateParams, id_prefix: str = "gen") -> PreparedGeneration:
    received = time.perf_counter()
    state.engine.check_capacity()
    adapter = state.registry.get(params.adapter) if params.adapter is not None else None
    try:
        validate_overrides(params.features, state.sae.d_sae)
    except FsrlError as exc:
        raise InvalidField("features", str(exc).removeprefix("features: ")) from exc
    prompt_ids = encode_prompt(state.base.tokenizer, params)
    if len(prompt_ids) > state.settings.max_prompt_tokens:
        raise InvalidField("messages" if params.messages is not None else "prompt",
                           f"{len(prompt_ids)} tokens; this server takes at most "
                           f"{state.settings.max_prompt_tokens}")

    cap = state.settings.max_new_tokens_cap
    room = (state.max_positions or len(prompt_ids) + cap) - len(prompt_ids)
    if params.max_new_tokens is None:
        max_new = min(cap, room)
    else:
        max_new = params.max_new_tokens
        if max_new > cap:
            raise InvalidField("max_new_tokens", f"must be at most {cap} (the server's cap), "
                                                 f"got {max_new}")
    if max_new > room or max_new < 1:
        raise InvalidField("max_new_tokens", f"the prompt has {len(prompt_ids)} tokens and a "
                           f"request may hold {state.max_positions} in all: at most {max(room, 0)} "
                           f"new tokens fit, {max_new} asked")

    seed = params.seed if params.seed is not None else secrets.randbits(31)
    sampling = SamplingParams(max_new_tokens=max_new, temperature=params.temperature,
                              top_p=params.top_p, top_k=params.top_k, seed=seed,
                              stop=params.stop, ignore_eos=params.ignore_eos)
    steering = RowSteering(adapter=adapter, scale=params.steering_scale,
                           overrides=params.features,
                           steer_from=len(prompt_ids) if params.steer_positions == "generated" else 0)
    requests = [GenerationRequest(prompt_ids, steering, sampling, params.return_features)]
    if params.compare:
        requests.append(GenerationRequest(prompt_ids, RowSteering(), sampling, 0))
    state.metrics.adapter_requests[params.adapter or ""] += 1
    return PreparedGeneration(id=f"{id_prefix}-{uuid.uuid4().hex[:24]}", adapter_id=params.adapter,
                              seed=seed, prompt_tokens=len(prompt_ids), job=EngineJob(requests),
                              return_features=params.return_features, received=received)


def _outcome(state: ServerState, prepared: PreparedGeneration,
             results: Sequence[GenerationResult]) -> GenerationOutcome:
    job = prepared.job
    metrics = state.metrics
    if job.first_token is not None:
        metrics.time_to_first_token.observe(job.first_token - prepared.received)
    for name, result in zip(ROWS, results):
        metrics.generated_tokens[name] += result.completion_tokens
    return GenerationOutcome(prepared=prepared, steered=results[0],
                             base=results[1] if len(results) > 1 else None,
                             queue_ms=job.queue_s * 1000.0,
                             total_ms=(time.perf_counter() - prepared.received) * 1000.0)


async def run(state: ServerState, prepared: PreparedGeneration) -> GenerationOutcome:
    return _outcome(state, prepared, await state.engine.generate(prepared.job))


async def stream(state: ServerState, prepared: PreparedGeneration
                 ) -> AsyncIterator[TokenEvent | GenerationOutcome]:
    """Every token event as it comes, then the whole outcome."""
    rows: list[list[TokenEvent]] = [[] for _ in prepared.job.requests]
    async with aclosing(state.engine.stream(prepared.job)) as events:  # closing it aborts the job
        async for event in events:
            rows[event.row].append(event)
            yield event
    yield _outcome(state, prepared, job_results(prepared.job, rows))
