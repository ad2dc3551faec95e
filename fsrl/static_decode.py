"""Decoding with static shapes: a fixed number of row slots over a fixed-length cache, so that
a decode step is one graph that `torch.compile` builds once (on CUDA with CUDA graphs).

A `StaticDecoder` owns the buffers: a transformers `StaticCache` of `rows` x `columns`, the
step's inputs (tokens, positions, mask) and a `SteeringRows`; everything is written in place,
so the tensors keep their addresses from step to step. Every row writes its next token at one
shared column. A row that joins is prefilled on its own (eagerly: prompt lengths vary) and its
keys and values are copied to end just before that column; the columns in front of it are
padding the mask hides, as in `RunningBatch`, and its positions count from its own first
token. When the shared column reaches the end of the cache, all rows move left by the columns
no row uses any more; when a joining prompt is longer than the column, they move right.

A `StaticBatch` is the `RunningBatch` interface over those buffers, so the engine drives either.
Empty slots decode too (the step's shape is fixed); their mask always shows them the column
just written, so their attention stays finite, and their outputs are ignored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers.cache_utils import StaticCache, StaticLayer

from fsrl.errors import FsrlError
from fsrl.generation import GenerationRequest, Generator, TokenEvent, DecodeRow, new_rows, prefill, sample_rows
from fsrl.steering import SteeringRows, StepCapture

log = logging.getLogger(__name__)

class StaticDecoder:
    """The fixed buffers of static decoding for one generator, and its (compiled) step."""

    def __init__(self, generator: Generator, rows: int, columns: int, compile: bool = True):
        base = generator.base
        config = base.model.config.get_text_config(decoder=True)
        self.generator, self.rows, self.columns = generator, rows, columns
        self.cache = StaticCache(config=base.model.config, max_cache_len=columns)
        if any(type(layer) is not StaticLayer for layer in self.cache.layers):
            raise FsrlError(f"model {base.name} has attention layers other than plain full "
                            "attention (sliding windows or the like); static decoding does not "
                            "support it: serve without --compile-decode")
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        device = base.device
        self.cache.early_initialization(rows, heads, head_dim, base.dtype, device)
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.mask = torch.zeros(rows, columns, dtype=torch.long, device=device)
        self.steering = SteeringRows(rows, generator.sae, device=device, dtype=generator.sae.W_dec.dtype)
        for t in (self.tokens, self.positions, self.mask, *self.steering.tensors()):
            torch._dynamo.mark_static_address(t)  # CUDA graphs read them where they are
        self._forward: Callable[..., torch.Tensor] = self._logits
        if compile:
            # On CUDA, "reduce-overhead" replays the step as a CUDA graph.
            mode = "reduce-overhead" if device.type == "cuda" else None
            self._forward = torch.compile(self._logits, fullgraph=True, dynamic=False, mode=mode)
        self.owner: StaticBatch | None = None

    def _logits(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        g = self.generator
        out = g.base.model(input_ids=tokens, attention_mask=mask, position_ids=positions,
                           use_cache=True, logits_to_keep=1, **{g.cache_kwarg: self.cache})
        return out.logits[:, -1, :]

    def decode(self, column: int) -> tuple[torch.Tensor, StepCapture]:
        """One step for every slot, writing at `column`: logits (rows, V) and the capture. They
        are valid until the next step (a CUDA graph's replay writes over its outputs), so a
        caller copies what it keeps."""
        self.mask[:, column] = 1
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(column)  # where StaticLayer writes
        g = self.generator
        with torch.inference_mode(), g.hook.steering(self.steering.batch, self.positions) as capture:
            logits = self._forward(self.tokens, self.mask, self.positions)
        return logits, capture

    def warm_up(self, steps: int = 3) -> None:
        """Build the step now (compiling, and recording the CUDA graph), not on a request."""
        batch = self.batch()
        for column in range(steps):
            self.decode(column)
        batch.reset()
        skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
        if self.tokens.is_cuda and self._forward is not self._logits and skips:
            log.warning("torch.compile did not make the decode step a CUDA graph (%d skips; "
                        "TORCH_LOGS=perf_hints says why): it runs compiled, without graphs", skips)

    def batch(self) -> StaticBatch:
        """A batch over these buffers; it takes them from any batch made before it."""
        return StaticBatch(self)

    def shift(self, start: int, end: int, delta: int) -> None:
        """Move columns [start, end) of every slot by `delta` columns."""
        if delta == 0 or start == end:
            return
        with torch.no_grad():
            for layer in self.cache.layers:
                for t in (layer.keys, layer.values):
                    t[:, :, start + delta:end + delta] = t[:, :, start:end].clone()
            window = self.mask[:, start:end].clone()
            self.mask.zero_()
            self.mask[:, start + delta:end + delta] = window

    def place(self, slot: int, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
              end: int) -> None:
        """Slot `slot` holds one row's prefilled keys and values (per layer (H, n, D)) in
        columns [end - n, end), and sees only those."""
        n = keys[0].shape[-2]
        with torch.no_grad():
            for layer, k, v in zip(self.cache.layers, keys, values):
                layer.keys[slot, :, end - n:end] = k
                layer.values[slot, :, end - n:end] = v
            self.mask[slot] = 0
            self.mask[slot, end - n:end] = 1


class StaticBatch:
    """Rows decoding together in a `StaticDecoder`'s slots; the `RunningBatch` interface.

    `add` prefills new rows, samples their first tokens and puts the unfinished ones into free
    slots; `step` decodes one token for every row; finished rows leave at once; `drop` removes
    the rows of one owner; `rows_of` and `resume` rebuild rows from their host state.
    """

    def __init__(self, decoder: StaticDecoder):
        self.decoder = decoder
        slots = decoder.rows
        self.rows: list[DecodeRow | None] = [None] * slots
        self.next_token = [0] * slots
        self.start = [0] * slots  # each row's first cache column
        self.column = 0           # where every row writes its next token
        self.reset()

    def reset(self) -> None:
        """Empty every slot and take the decoder's buffers."""
        d = self.decoder
        d.owner = self
        for slot in range(d.rows):
            self._free(slot)
        self.column = 0
        with torch.no_grad():
            d.mask.zero_()

    def __len__(self) -> int:
        return sum(row is not None for row in self.rows)

    @property
    def can_join(self) -> bool:
        return len(self) < self.decoder.rows

    def _check_owner(self) -> None:
        if self.decoder.owner is not self:
            raise RuntimeError("a newer batch has taken this decoder's buffers")

    def _occupied(self) -> list[int]:
        return [slot for slot, row in enumerate(self.rows) if row is not None]

    def add(self, requests: Sequence[GenerationRequest], owners: Sequence[Any] | None = None
            ) -> list[tuple[Any, TokenEvent]]:
        """As `RunningBatch.add`. Raises before changing anything when the rows do not fit in
        the free slots or a row's prompt plus new tokens does not fit in the cache."""
        return self.resume(new_rows(self.decoder.generator, requests, owners)) if requests else []

    def resume(self, rows: Sequence[DecodeRow]) -> list[tuple[Any, TokenEvent]]:
        """As `RunningBatch.resume`, with the checks of `add`."""
        if not rows:
            return []
        self._check_owner()
        d = self.decoder
        free = [slot for slot, row in enumerate(self.rows) if row is None]
        if len(rows) > len(free):
            raise RuntimeError(f"{len(rows)} rows cannot join: {len(free)} slots are free")
        for row in rows:
            r = row.request
            if len(r.prompt_ids) + r.sampling.max_new_tokens > d.columns:
                raise FsrlError(f"a prompt of {len(r.prompt_ids)} tokens and "
                                f"{r.sampling.max_new_tokens} new tokens do not fit in the "
                                f"static cache's {d.columns} columns")
        logits, cache, capture, _, lengths = prefill(d.generator, rows)
        events, tokens = sample_rows(rows, logits, capture)
        keep = [b for b, row in enumerate(rows) if row.finish_reason is None]
        if keep:
            self._fit(max(int(lengths[b]) for b in keep))
            for b, slot in zip(keep, free):
                n = int(lengths[b])
                d.place(slot, [layer.keys[b, :, -n:] for layer in cache.layers],
                        [layer.values[b, :, -n:] for layer in cache.layers], self.column)
                d.positions[slot, 0] = n
                d.steering.set_row(slot, rows[b].request.steering)
                self.rows[slot] = rows[b]
                self.next_token[slot], self.start[slot] = tokens[b], self.column - n
        return events

    def rows_of(self, owner: Any) -> list[DecodeRow]:
        """The unfinished rows added with `owner`."""
        return [row for row in self.rows if row is not None and row.owner is owner]

    def step(self) -> list[tuple[Any, TokenEvent]]:
        """One decode step for every row; finished rows leave."""
        occupied = self._occupied()
        if not occupied:
            return []
        self._check_owner()
        d = self.decoder
        self._fit(0)
        index = torch.tensor(occupied, device=d.tokens.device)
        d.tokens[index, 0] = torch.tensor([self.next_token[s] for s in occupied], device=index.device)
        logits, capture = d.decode(self.column)  # indexing by `index` below copies what is kept
        self.column += 1
        with torch.no_grad():
            d.positions[index] += 1  # empty slots stay at 0: learned position tables are finite
        rows = [self.rows[s] for s in occupied]
        wants_features = any(row.features is not None for row in rows)
        capture = StepCapture(top_index=capture.top_index[index], top_delta=capture.top_delta[index]
                              ) if wants_features else StepCapture()
        events, tokens = sample_rows(rows, logits[index], capture)
        for slot, row, token in zip(occupied, rows, tokens):
            self.next_token[slot] = token
            if row.finish_reason is not None:
                self._free(slot)
        return events

    def drop(self, owner: Any) -> int:
        """Remove every row added with `owner`; returns how many there were."""
        self._check_owner()
        slots = [s for s in self._occupied() if self.rows[s].owner is owner]
        for slot in slots:
            self._free(slot)
        return len(slots)

    def _free(self, slot: int) -> None:
        self.rows[slot] = None
        self.decoder.steering.set_row(slot, None)
        with torch.no_grad():
            self.decoder.positions[slot] = 0

    def _fit(self, need: int) -> None:
        """Move every row so that `need` columns fit before the write column and the write
        column is inside the cache."""
        if need <= self.column < self.decoder.columns:
            return
        occupied = self._occupied()
        first = min((self.start[s] for s in occupied), default=self.column)
        delta = max(need - self.column, -first)
        if delta == 0 or self.column + delta >= self.decoder.columns:
            raise RuntimeError(f"rows spanning {self.column - first} columns and a prompt of "
                               f"{need} tokens do not fit in {self.decoder.columns} columns")
        self.decoder.shift(first, self.column, delta)
        for s in occupied:
            self.start[s] += delta
        self.column += delta


def use_static_decode(generator: Generator, rows: int, columns: int, compile: bool = True) -> StaticDecoder:
    """From now on `generator.batch()` decodes in `rows` slots over `columns` cache columns; the
    step is built (and compiled) here, before any request waits for it."""
    decoder = StaticDecoder(generator, rows, columns, compile=compile)
    started = time.perf_counter()
    decoder.warm_up()
    log.info("static decode step (%d rows x %d columns%s) ready in %.1f s", rows, columns,
             ", compiled" if compile else "", time.perf_counter() - started)
    generator.static_decoder = decoder
    return decoder
