"""Batched generation under per-row steering, with per-row sampling, seeds and stop conditions.

Each row carries its own steering (through `fsrl.steering`), sampling parameters and seed. Row
sampling draws from the row's own `torch.Generator`, so a seeded request samples the same
tokens whatever else shares its batch. Rows are left-padded; every row's positions count from
its own first token, so padding changes nothing.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from fsrl.models import BaseModel
from fsrl.sae import Sae
from fsrl.steering import RowSteering, SteeringBatch, SteeringHook


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    steering: RowSteering = field(default_factory=RowSteering)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    return_features: int = 0  # top steered features to report per generated token


@dataclass
class TokenEvent:
    """One step of one row: the new token, the text it added, and whether the row is done."""

    row: int
    token_id: int
    text_delta: str
    finished: bool
    finish_reason: str | None = None
    features: list[tuple[int, float]] | None = None
    text: str | None = None  # the row's whole text, on its last event


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str
    features: list[list[tuple[int, float]]] | None = None
    first_token_s: float | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def _filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p on one row's logits: (V,) -> (V,)."""
    logits = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= params.top_p  # keep the token that crosses p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


class _Row:
    """Host-side state of one row while it generates."""

    def __init__(self, request: GenerationRequest, tokenizer, eos_ids: set[int]):
        self.request = request
        self.params = request.sampling
        self.generator = torch.Generator().manual_seed(int(request.sampling.seed))
        self.tokenizer = tokenizer
        self.eos_ids = set() if request.sampling.ignore_eos else eos_ids
        self.token_ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of text already handed out
        self.finish_reason: str | None = None
        self.features: list[list[tuple[int, float]]] | None = [] if request.return_features else None

    def choose(self, logits: torch.Tensor, greedy_token: int) -> int:
        if self.params.temperature <= 0:
            return greedy_token
        probs = _filter_logits(logits, self.params).softmax(-1).cpu()
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def push(self, token: int, features: list[tuple[int, float]] | None) -> str:
        """Record a token; returns the text that may be shown now.

        Text that could still turn into a stop string, or a character cut in half by the
        token boundary, is held back until the next token decides it.
        """
        self.token_ids.append(token)
        if self.features is not None:
            self.features.append(features or [])
        if token in self.eos_ids:
            self.finish_reason = "stop"
        else:
            full = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
            for stop in self.params.stop:
                at = full.find(stop, max(0, len(self.text) - len(stop)))
                if at != -1:
                    full, self.finish_reason = full[:at], "stop"
                    break
            self.text = full
            if self.finish_reason is None and len(self.token_ids) >= self.params.max_new_tokens:
                self.finish_reason = "length"
        shown = len(self.text)
        if self.finish_reason is None:
            shown -= _held_back(self.text, self.params.stop)
        delta = self.text[self.emitted:shown]
        self.emitted = max(self.emitted, shown)
        return delta


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters might still become a stop string or a whole character."""
    if text.endswith("\ufffd"):
        return 1
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return hold


class Generator:
    """Generates for a batch of requests on one model, steering at one SAE layer."""

    def __init__(self, base: BaseModel, sae: Sae, layer: int):
        self.base, self.sae, self.layer = base, sae, layer
        self.hook = SteeringHook(base.layers, layer, sae)
        params = inspect.signature(base.model.forward).parameters
        # transformers 5 renamed past_key_values to cache.
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        cfg = getattr(base.model, "generation_config", None)
        eos = getattr(cfg, "eos_token_id", None) or base.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}

    def _forward(self, input_ids, attention_mask, position_ids, cache, batch, positions):
        kwargs = {self._cache_kwarg: cache}
        with torch.inference_mode(), self.hook.steering(batch, positions) as capture:
            out = self.base.model(input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, use_cache=True, logits_to_keep=1,
                                  **kwargs)
        new_cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        return out.logits[:, -1, :], new_cache, capture

    def stream(self, requests: Sequence[GenerationRequest]) -> Iterator[TokenEvent]:
        """Generate all rows together; yields one event per row per step until all finish."""
        device = self.base.device
        rows = [_Row(r, self.base.tokenizer, self.eos_ids) for r in requests]
        capture_top = max((r.return_features for r in requests), default=0)
        batch = SteeringBatch.build([r.steering for r in requests], self.sae.d_sae, device=device,
                                    dtype=self.sae.W_dec.dtype, capture_top=capture_top)
        lengths = torch.tensor([len(r.prompt_ids) for r in requests], device=device)
        width = int(lengths.max())
        pad_id = self.base.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
        for b, r in enumerate(requests):
            input_ids[b, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, device=device)
        positions = torch.arange(width, device=device)[None, :] - (width - lengths)[:, None]   # (B, T)
        attention_mask = (positions >= 0).long()
        positions = positions.clamp(min=-1)

        logits, cache, capture = self._forward(input_ids, attention_mask, positions.clamp(min=0),
                                               None, batch, positions)
        step = 0
        while True:
            greedy = logits.argmax(-1).tolist()
            top_i = capture.top_index.tolist() if capture.top_index is not None else None
            top_d = capture.top_delta.tolist() if capture.top_delta is not None else None
            next_tokens = []
            for b, row in enumerate(rows):
                if row.finish_reason is not None:
                    next_tokens.append(pad_id)
                    continue
                token = row.choose(logits[b], greedy[b])
                feats = None
                if row.features is not None and top_i is not None:
                    k = row.request.return_features
                    feats = [(i, d) for i, d in zip(top_i[b][:k], top_d[b][:k]) if d != 0.0]
                delta = row.push(token, feats)
                next_tokens.append(token)
                done = row.finish_reason is not None
                yield TokenEvent(b, token, delta, done, row.finish_reason, feats,
                                 text=row.text if done else None)
            if all(r.finish_reason is not None for r in rows):
                return
            step += 1
            pos = (lengths + step - 1)[:, None]                                               # (B, 1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=1)
            tokens = torch.tensor(next_tokens, dtype=torch.long, device=device)[:, None]
            logits, cache, capture = self._forward(tokens, attention_mask, pos, cache, batch, pos)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        rows: list[list[TokenEvent]] = [[] for _ in requests]
        for event in self.stream(requests):
            rows[event.row].append(event)
        return results_from_events(requests, rows)


def results_from_events(requests: Sequence[GenerationRequest], rows: Sequence[Sequence[TokenEvent]],
                        first_token_s: float | None = None) -> list[GenerationResult]:
    """Each row's token events put together into its result."""
    results = []
    for request, events in zip(requests, rows):
        last = events[-1]
        results.append(GenerationResult(
            token_ids=[e.token_id for e in events], text=last.text or "",
            finish_reason=last.finish_reason or "length",
            features=[e.features or [] for e in events] if request.return_features else None,
            first_token_s=first_token_s))
    return results
