"""Batched generation under per-row steering, with per-row sampling, seeds and stop conditions.

Each row carries its own steering (through `fsrl.steering`), sampling parameters and seed. Row
sampling draws from the row's own `torch.Generator`, so a seeded request samples the same
tokens whatever else shares its batch. Rows are left-padded; every row's positions count from
its own first token, so padding changes nothing.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from transformers.cache_utils import DynamicLayer

from fsrl.models import BaseModel
from fsrl.sampling import MIN_TEMPERATURE, SamplingParams
from fsrl.sae import Sae
from fsrl.steering import RowSteering, StepCapture, SteeringBatch, SteeringHook


LogProbs = tuple[float, list[tuple[int, float]]]  # a token's log-probability, and the top-k's
LOGPROB_FLOOR = -9999.0


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    steering: RowSteering = field(default_factory=RowSteering)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    return_features: int = 0  # top steered features to report per generated token
    logprobs: int | None = None  # per generated token: its log-probability and the top k's
    prompt_logprobs: int | None = None  # the same for prompt tokens 1.., on the first event
    telemetry: bool = False  # per generated token: what the steering did (`TokenEvent.telemetry`)
    compare_with: int | None = None  # with telemetry: the row (of the same owner) whose next-token
                                     # distribution the KL divergence is taken from (a compare's base)


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
    logprobs: LogProbs | None = None  # of this token, under the (steered) model, before sampling
    prompt_logprobs: list[LogProbs] | None = None  # first event only: prompt tokens 1..n-1
    error: str | None = None  # this row failed (finish_reason "error"); the others go on
    fired_feature: int | None = None  # finish_reason "feature": the abort condition's feature
    telemetry: dict[str, Any] | None = None  # with GenerationRequest.telemetry: see `step_telemetry`

    @property
    def has_token(self) -> bool:
        """An error, or a stop on a feature, ends a row without a new token."""
        return self.token_id >= 0


class RowError(Exception):
    """One row cannot go on (its logits are not finite, say); the message is safe to show."""


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str
    features: list[list[tuple[int, float]]] | None = None
    first_token_s: float | None = None
    logprobs: list[LogProbs] | None = None         # per generated token, when asked for
    prompt_logprobs: list[LogProbs] | None = None  # prompt tokens 1..n-1, when asked for
    error: str | None = None                       # finish_reason "error": why
    fired_feature: int | None = None               # finish_reason "feature": which feature
    telemetry: list[dict[str, Any] | None] | None = None  # per generated token, when asked for

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


class DecodeRow:
    """Host-side state of one row while it generates: what it has produced so far, so that a
    batch can be rebuilt from it (`resume`) after a failed step."""

    def __init__(self, request: GenerationRequest, tokenizer, eos_ids: set[int], owner: Any = None,
                 local: int = 0):
        self.request = request
        self.owner, self.local = owner, local  # who added it, and its `TokenEvent.row`
        self.params = request.sampling
        self.generator = torch.Generator().manual_seed(int(request.sampling.seed))
        self.tokenizer = tokenizer
        self.eos_ids = set() if request.sampling.ignore_eos else eos_ids
        self.token_ids: list[int] = []
        self.text = ""
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.emitted = 0  # characters of text already handed out
        self.finish_reason: str | None = None
        self.features: list[list[tuple[int, float]]] | None = [] if request.return_features else None
        self.prompt_logprobs: list[LogProbs] | None = None  # set by prefill, sent with the first event

    @property
    def context_ids(self) -> list[int]:
        """What the model has to read to produce this row's next token."""
        return self.request.prompt_ids + self.token_ids

    def penalise(self, logits: torch.Tensor) -> torch.Tensor:
        """One row's logits (V,) less its presence and frequency penalties (over the tokens it
        has generated, not the prompt: OpenAI's and vLLM's rule)."""
        counts = torch.bincount(torch.tensor(self.token_ids, dtype=torch.long), minlength=logits.shape[-1])
        counts = counts[:logits.shape[-1]].to(logits.device, torch.float32)
        return (logits.float() - self.params.frequency_penalty * counts
                - self.params.presence_penalty * (counts > 0).float())

    def choose(self, logits: torch.Tensor, greedy_token: int) -> int:
        if self.params.penalised and self.token_ids:
            logits = self.penalise(logits)
            greedy_token = int(logits.argmax())
        if self.params.temperature < MIN_TEMPERATURE:
            return greedy_token
        probs = _filter_logits(logits, self.params).softmax(-1).cpu()
        if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
            raise RowError("sampling failed: the token probabilities are not finite")
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def fail(self, message: str) -> TokenEvent:
        """Finish this row with an error; its event carries no token."""
        self.finish_reason = "error"
        return TokenEvent(self.local, -1, "", True, "error", text=self.text, error=message)

    def stop_on_feature(self, feature: int) -> TokenEvent:
        """Finish this row because an `abort_when` condition passed on its last token's
        position; the event carries no token, and the text held back is shown."""
        self.finish_reason = "feature"
        self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        self._cut_at_stop(0)
        delta = self.text[self.emitted:]
        self.emitted = len(self.text)
        return TokenEvent(self.local, -1, delta, True, "feature", text=self.text, fired_feature=feature)

    def push(self, token: int, features: list[tuple[int, float]] | None) -> str:
        """Record a token; returns the text that may be shown now.

        Text that could still turn into a stop string, or a character cut in half by the
        token boundary, is held back until the next token decides it. While the row runs its
        text grows by `IncrementalDetokenizer` (a short window per token); when it finishes,
        its text is the decode of all its tokens, exactly.
        """
        self.token_ids.append(token)
        if self.features is not None:
            self.features.append(features or [])
        before = len(self.text)
        if token in self.eos_ids:
            self.finish_reason = "stop"
        else:
            self.text += self.detokenizer.step(self.token_ids)
            if len(self.token_ids) >= self.params.max_new_tokens:
                self.finish_reason = "length"
        if self.finish_reason is not None:
            self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        self._cut_at_stop(before)
        shown = len(self.text)
        if self.finish_reason is None:
            shown -= _held_back(self.text, self.params.stop)
        delta = self.text[self.emitted:shown]
        self.emitted = max(self.emitted, shown)
        return delta

    def _cut_at_stop(self, searched_up_to: int) -> None:
        """End the text at the first stop string that reaches past `searched_up_to`."""
        for stop in self.params.stop:
            at = self.text.find(stop, max(0, searched_up_to - len(stop)))
            if at != -1:
                self.text, self.finish_reason = self.text[:at], "stop"
                return


class IncrementalDetokenizer:
    """The text of a growing token list, decoding a short window per new token (O(1)
    amortised, where decoding the whole list each time is O(n) per token): the window starts
    at the tokens whose text was last handed out, so tokenizers that mark a word's leading
    space on its first token still decode right. Text that ends in a character cut by the token
    boundary waits for the next token (the method of TGI's and vLLM's detokenizers)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.prefix = 0   # first token of the window
        self.read = 0     # tokens whose text has been handed out

    def step(self, token_ids: Sequence[int]) -> str:
        """New text since the last call (possibly ""), after `token_ids` grew."""
        prefix_text = self.tokenizer.decode(token_ids[self.prefix:self.read], skip_special_tokens=True)
        new_text = self.tokenizer.decode(token_ids[self.prefix:], skip_special_tokens=True)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(token_ids)
            return new_text[len(prefix_text):]
        return ""


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


class DecodeBatch(Protocol):
    """Rows decoding together that rows join and leave between steps: what `Generator.stream`
    and the server's engine drive (`RunningBatch`). Every event comes paired with its row's owner."""

    def __len__(self) -> int: ...

    @property
    def can_join(self) -> bool: ...

    def add(self, requests: Sequence[GenerationRequest], owners: Sequence[Any] | None = None
            ) -> list[tuple[Any, TokenEvent]]: ...

    def step(self) -> list[tuple[Any, TokenEvent]]: ...

    def drop(self, owner: Any) -> int: ...

    def rows_of(self, owner: Any) -> list[DecodeRow]: ...

    def resume(self, rows: Sequence[DecodeRow]) -> list[tuple[Any, TokenEvent]]: ...


class Generator:
    """Generates on one model, steering at one SAE layer. `stream`/`generate` run a fixed set
    of requests; `batch()` gives a `DecodeBatch` for rows to join and leave."""

    def __init__(self, base: BaseModel, sae: Sae, layer: int | None = None):
        self.base, self.sae = base, sae
        self.site = sae.site_at(layer)  # the SAE's own site; `layer` moves it (a --layer override)
        self.layer = self.site.layer
        self.hook = SteeringHook(base.layers, self.site, sae)
        params = inspect.signature(base.model.forward).parameters
        # transformers 5 renamed past_key_values to cache.
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        cfg = getattr(base.model, "generation_config", None)
        eos = getattr(cfg, "eos_token_id", None) or base.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        self.pad_id = base.tokenizer.pad_token_id or 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
                cache: Any, batch: SteeringBatch, every_position: bool = False
                ) -> tuple[torch.Tensor, Any, StepCapture]:
        """One forward under steering: last-position logits (B, V) (with `every_position`, every
        position's (B, T, V)), the grown cache, and what the steering captured. `positions`
        (B, T) counts from each row's own first token; it is negative on left padding (never
        steered, fed to the model as 0)."""
        kwargs = {self.cache_kwarg: cache}
        with torch.inference_mode(), self.hook.steering(batch, positions) as capture:
            out = self.base.model(input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=positions.clamp(min=0), use_cache=True,
                                  logits_to_keep=0 if every_position else 1, **kwargs)
        new_cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        return (out.logits if every_position else out.logits[:, -1, :]), new_cache, capture

    def batch(self) -> DecodeBatch:
        """A batch for rows to join and leave."""
        return RunningBatch(self)

    def stream(self, requests: Sequence[GenerationRequest]) -> Iterator[TokenEvent]:
        """Generate all rows together; yields one event per row per step until all finish."""
        running = self.batch()
        for _, event in running.add(requests):
            yield event
        while running:
            for _, event in running.step():
                yield event

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        collected = EventsByRow(requests)
        for event in self.stream(requests):
            collected.add(event)
        return collected.results()


def new_rows(generator: Generator, requests: Sequence[GenerationRequest],
             owners: Sequence[Any] | None = None) -> list[DecodeRow]:
    """A row for each request. `owners[i]` tags request i (default None); a row's
    `TokenEvent.row` counts the requests before it in this call with the same owner."""
    owners = list(owners) if owners is not None else [None] * len(requests)
    return [DecodeRow(r, generator.base.tokenizer, generator.eos_ids, owner,
                 sum(o is owner for o in owners[:b]))
            for b, (r, owner) in enumerate(zip(requests, owners))]


def steering_for(generator: Generator, requests: Sequence[GenerationRequest]) -> SteeringBatch:
    g = generator
    return SteeringBatch.build([r.steering for r in requests], g.sae.d_sae, device=g.base.device,
                               dtype=g.sae.W_dec.dtype,
                               capture_top=max((r.return_features for r in requests), default=0),
                               telemetry=any(r.telemetry for r in requests))


def prefill(generator: Generator, rows: Sequence[DecodeRow]
            ) -> tuple[torch.Tensor, Any, StepCapture, torch.Tensor, torch.Tensor]:
    """One forward over the rows' contexts (prompt, plus what a resumed row has generated),
    left-padded to the longest: their last-position logits (B, V), the cache, the capture, the
    mask (B, W) and the context lengths (B,). A new row that asks for prompt log-probabilities
    gets them here (`DecodeRow.prompt_logprobs`)."""
    g = generator
    device = g.base.device
    steering = steering_for(g, [row.request for row in rows])
    contexts = [row.context_ids for row in rows]
    lengths = torch.tensor([len(c) for c in contexts], device=device)
    width = int(lengths.max())
    input_ids = torch.full((len(rows), width), g.pad_id, dtype=torch.long, device=device)
    for b, ids in enumerate(contexts):
        input_ids[b, width - len(ids):] = torch.tensor(ids, device=device)
    positions = torch.arange(width, device=device)[None, :] - (width - lengths)[:, None]   # (B, T)
    mask = (positions >= 0).long()
    scored = [row.request.prompt_logprobs is not None and not row.token_ids for row in rows]
    logits, cache, capture = g.forward(input_ids, mask, positions.clamp(min=-1), None, steering,
                                       every_position=any(scored))
    if any(scored):
        for b, row in enumerate(rows):
            if scored[b]:
                ids = contexts[b]
                # Position p's logits score token p + 1; left padding shifts the row by width - n.
                start = width - len(ids)
                row.prompt_logprobs = _logprobs(logits[b, start:width - 1], ids[1:],
                                                row.request.prompt_logprobs)
        logits = logits[:, -1, :]
    return logits, cache, capture, mask, lengths


def _logprobs(logits: torch.Tensor, tokens: Sequence[int], top: int) -> list[LogProbs]:
    """Each position's log-probability of `tokens[i]` under `logits[i]` (N, V), and its top."""
    if not len(tokens):
        return []
    # A token the model rules out (-inf) reads as -9999, as vLLM reports it: JSON has no -inf.
    logp = logits.float().log_softmax(-1).clamp(min=LOGPROB_FLOOR)
    chosen = logp.gather(-1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    if top > 0:
        values, indices = logp.topk(min(top, logp.shape[-1]), dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    else:
        tops = [[] for _ in tokens]
    return list(zip(chosen, tops))


def sample_rows(rows: Sequence[DecodeRow], logits: torch.Tensor, capture: StepCapture
                ) -> tuple[list[tuple[Any, TokenEvent]], list[int]]:
    """Each row's next token from its logits (B, V) and the events they make, paired with each
    row's owner. A row that cannot go on (`RowError`, non-finite logits) finishes with an
    error event; the other rows are not affected."""
    greedy = logits.argmax(-1).tolist()
    # NaN or +inf anywhere is a broken row; -inf alone is a token the model rules out.
    broken = (torch.isnan(logits) | torch.isposinf(logits)).any(-1).tolist()
    top_i = capture.top_index.tolist() if capture.top_index is not None else None
    top_d = capture.top_delta.tolist() if capture.top_delta is not None else None
    fired = capture.fired.tolist() if capture.fired is not None else [-1] * len(rows)
    telemetry = step_telemetry(rows, logits, capture)
    events, tokens = [], []
    for b, row in enumerate(rows):
        if fired[b] >= 0:  # an abort condition passed at a generated position: no next token
            events.append((row.owner, row.stop_on_feature(fired[b])))
            tokens.append(0)
            continue
        try:
            if broken[b]:
                raise RowError("the model's output for this request is not finite "
                               "(steering too strong for this model's precision?)")
            token = row.choose(logits[b], greedy[b])
        except RowError as exc:
            events.append((row.owner, row.fail(str(exc))))
            tokens.append(0)
            continue
        feats = None
        if row.features is not None and top_i is not None:
            k = row.request.return_features
            feats = [(i, d) for i, d in zip(top_i[b][:k], top_d[b][:k]) if d != 0.0]
        logprobs = (_logprobs(logits[b:b + 1], [token], row.request.logprobs)[0]
                    if row.request.logprobs is not None else None)
        prompt_logprobs, row.prompt_logprobs = row.prompt_logprobs, None
        delta = row.push(token, feats)
        done = row.finish_reason is not None
        events.append((row.owner, TokenEvent(row.local, token, delta, done, row.finish_reason,
                                             feats, text=row.text if done else None,
                                             logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                                             telemetry=telemetry[b])))
        tokens.append(token)
    return events, tokens


def step_telemetry(rows: Sequence[DecodeRow], logits: torch.Tensor, capture: StepCapture
                   ) -> list[dict[str, Any] | None]:
    """For each row that asks: the steering's L2 norm in the residual stream at the position
    that predicts this token (`norm`), the features it pushed there (`pushed`), the overrides
    whose `when` condition passed there (`conditions`, their feature indices), and `kl`: the
    KL divergence of this row's next-token distribution from its `compare_with` row's, at the
    same step (None when that row is not in this step)."""
    out: list[dict[str, Any] | None] = [None] * len(rows)
    if not any(row.request.telemetry for row in rows):
        return out
    t = capture.telemetry
    norm = t.norm.tolist() if t is not None else [0.0] * len(rows)
    pushed = t.pushed.tolist() if t is not None else [0] * len(rows)
    passed = t.when_passed.tolist() if t is not None else [[] for _ in rows]
    where = {(id(row.owner), row.local): b for b, row in enumerate(rows)}
    logp = None
    for b, row in enumerate(rows):
        request = row.request
        if not request.telemetry:
            continue
        kl = None
        partner = where.get((id(row.owner), request.compare_with)) if request.compare_with is not None else None
        if partner is not None:
            logp = logits.float().log_softmax(-1) if logp is None else logp
            p = logp[b].exp()
            kl = float(torch.where(p > 0, p * (logp[b] - logp[partner]), 0.0).sum().clamp(min=0.0))
            kl = kl if math.isfinite(kl) else None  # a token the base rules out: JSON has no Infinity
        out[b] = {"norm": float(norm[b]), "pushed": int(pushed[b]), "kl": kl,
                  "conditions": [o.index for o, hit in zip(request.steering.overrides, passed[b]) if hit]}
    return out


def _plain_layers(cache: Any) -> list | None:
    """The cache's layers when every one is a plain growing key/value cache (rows of two such
    caches can be stacked), else None (sliding windows and the like: rows cannot join)."""
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer or not layer.is_initialized
                         for layer in layers):
        return None
    return list(layers)


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, H, width, D) with zeros in front; the mask hides them."""
    if t.shape[-2] == width:
        return t
    return torch.cat([t.new_zeros(*t.shape[:-2], width - t.shape[-2], t.shape[-1]), t], dim=-2)


class RunningBatch:
    """Rows generating together, for continuous batching.

    `add` prefills new rows on their own, samples their first tokens, and stacks their cache
    under the running rows' (left-padded to a common width; each row keeps its own positions,
    so padding changes nothing). `step` decodes one token for every row. Finished rows leave
    at once; `drop` removes rows whose client went away. Every event comes paired with the
    owner its row was added with. `rows_of` and `resume` rebuild rows in another batch from
    their host state (after a failed step has left this one unusable).
    """

    def __init__(self, generator: Generator):
        self.generator = generator
        self.rows: list[DecodeRow] = []
        self.cache: Any = None
        self.attention_mask: torch.Tensor | None = None   # (B, W) over the cache, plus the next token
        self.next_position: torch.Tensor | None = None    # (B,) position of each row's next input
        self.next_token: list[int] = []                   # each row's last sampled token
        self.steering: SteeringBatch | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def can_join(self) -> bool:
        """Whether new rows can join now (always when empty)."""
        return not self.rows or _plain_layers(self.cache) is not None

    def add(self, requests: Sequence[GenerationRequest], owners: Sequence[Any] | None = None
            ) -> list[tuple[Any, TokenEvent]]:
        """Prefill `requests` (one forward for all) and sample their first tokens; unfinished
        rows join the batch. `owners[i]` tags request i (default None); a row's `TokenEvent.row`
        counts the requests before it in this call with the same owner."""
        return self.resume(new_rows(self.generator, requests, owners)) if requests else []

    def resume(self, rows: Sequence[DecodeRow]) -> list[tuple[Any, TokenEvent]]:
        """Rows join from their host state (new, or taken from another batch with `rows_of`):
        one forward over their contexts gives each its next token."""
        if not rows:
            return []
        if not self.can_join:
            raise RuntimeError("this model's cache cannot take rows mid-generation; wait until the batch is empty")
        logits, cache, capture, mask, lengths = prefill(self.generator, rows)
        events, tokens = sample_rows(rows, logits, capture)
        keep = [b for b, row in enumerate(rows) if row.finish_reason is None]
        if keep:
            if len(keep) < len(rows):
                cache.batch_select_indices(torch.tensor(keep, device=lengths.device))
            self._join(cache, mask[keep], lengths[keep], [rows[b] for b in keep], [tokens[b] for b in keep])
        return events

    def rows_of(self, owner: Any) -> list[DecodeRow]:
        """The unfinished rows added with `owner`."""
        return [row for row in self.rows if row.owner is owner]

    def step(self) -> list[tuple[Any, TokenEvent]]:
        """One decode step for every row; finished rows leave."""
        if not self.rows:
            return []
        device = self.generator.base.device
        self.attention_mask = torch.cat(
            [self.attention_mask, self.attention_mask.new_ones(len(self.rows), 1)], dim=1)
        tokens = torch.tensor(self.next_token, dtype=torch.long, device=device)[:, None]
        pos = self.next_position[:, None]
        logits, self.cache, capture = self.generator.forward(tokens, self.attention_mask, pos,
                                                             self.cache, self.steering)
        self.next_position = self.next_position + 1
        events, self.next_token = sample_rows(self.rows, logits, capture)
        self._keep([b for b, row in enumerate(self.rows) if row.finish_reason is None])
        return events

    def drop(self, owner: Any) -> int:
        """Remove every row added with `owner`; returns how many there were."""
        keep = [b for b, row in enumerate(self.rows) if row.owner is not owner]
        dropped = len(self.rows) - len(keep)
        if dropped:
            self._keep(keep)
        return dropped

    def _join(self, cache: Any, mask: torch.Tensor, lengths: torch.Tensor, rows: list[DecodeRow],
              tokens: list[int]) -> None:
        if not self.rows:
            self.cache, self.attention_mask = cache, mask
            self.next_position = lengths.clone()
        else:
            width = max(self.attention_mask.shape[1], mask.shape[1])
            for old, new in zip(_plain_layers(self.cache), _plain_layers(cache)):
                old.keys = torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)])
                old.values = torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)])
            pad = lambda m: torch.cat([m.new_zeros(m.shape[0], width - m.shape[1]), m], dim=1)  # noqa: E731
            self.attention_mask = torch.cat([pad(self.attention_mask), pad(mask)])
            self.next_position = torch.cat([self.next_position, lengths])
        self.rows += rows
        self.next_token += tokens
        self.steering = steering_for(self.generator, [r.request for r in self.rows])

    def _keep(self, keep: list[int]) -> None:
        """Keep only rows `keep` (in order); trims cache columns that only padding uses."""
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[b] for b in keep]
        self.next_token = [self.next_token[b] for b in keep]
        if not keep:
            self.cache = self.attention_mask = self.next_position = self.steering = None
            return
        index = torch.tensor(keep, device=self.attention_mask.device)
        self.cache.batch_select_indices(index)
        self.attention_mask = self.attention_mask[index]
        self.next_position = self.next_position[index]
        layers = _plain_layers(self.cache)
        unused = int(self.attention_mask.any(dim=0).long().argmax())  # leading all-padding columns
        if layers is not None and unused > 0:
            for layer in layers:
                layer.keys, layer.values = layer.keys[..., unused:, :], layer.values[..., unused:, :]
            self.attention_mask = self.attention_mask[:, unused:]
        self.steering = steering_for(self.generator, [r.request for r in self.rows])


class EventsByRow:
    """Token events kept row by row as they stream, then put together into each row's result:
    what `Generator.generate`, the engine and the server's streams all collect."""

    def __init__(self, requests: Sequence[GenerationRequest]):
        self.requests = list(requests)
        self.rows: list[list[TokenEvent]] = [[] for _ in self.requests]

    def add(self, event: TokenEvent) -> TokenEvent:
        self.rows[event.row].append(event)
        return event

    def results(self, first_token_s: float | None = None) -> list[GenerationResult]:
        """Each row's token events put together into its result."""
        results = []
        for request, events in zip(self.requests, self.rows):
            last = events[-1]
            tokens = [e for e in events if e.has_token]
            results.append(GenerationResult(
                token_ids=[e.token_id for e in tokens], text=last.text or "",
                finish_reason=last.finish_reason or "length",
                features=[e.features or [] for e in tokens] if request.return_features else None,
                first_token_s=first_token_s,
                logprobs=[e.logprobs for e in tokens] if request.logprobs is not None else None,
                prompt_logprobs=events[0].prompt_logprobs, error=last.error,
                fired_feature=last.fired_feature,
                telemetry=[e.telemetry for e in tokens] if request.telemetry else None))
        return results
