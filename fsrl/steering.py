"""The steering intervention: the one place that implements API.md's steering semantics.

At the hook layer, for every row b of a batch and every token position t:

    x      residual activation                                         (B, T, d_in)
    f      = SAE.encode(x)                                             (B, T, d_sae)
    v      = adapter_b(x)            the row's own adapter, or 0
    g      = f + s_b * v             (adapter.clamp_nonnegative: g = relu(g))
    overrides on feature i of row b, applied to g_i in delta form d = g - f:
        set     d_i = value - f_i           add     d_i = d_i + value
        scale   d_i = (f_i + d_i) * value - f_i
        ablate  d_i = -f_i                  unsteer d_i = 0
    x'     = x + d @ W_dec           (the SAE's error term is kept: decode is linear)

Conditions read f before steering, at the same position and site: an override with
`when = (j, above|below, t)` changes d_i only where f_j > t (or f_j < t), and a row's
`abort_when` conditions report, at each generated position (position >= the prompt's length),
the first one that passes (`SteerOutput.fired`); the generation loop stops the row there.

Rows and positions with nothing to do are returned bit-for-bit unchanged.

Working in delta form is what makes steering cheap: f is needed only where a clamp or a
set/scale/ablate override reads it (and then, for element-wise SAEs, only at the overridden
features), and since d is sparse only the rows of W_dec that d touches are read. Everything
per-row is a tensor (adapter slot, scale, override index/op/value, first steered position), so
the forward has no per-row Python branching and compiles.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fsrl.adapter import SteeringAdapter
from fsrl.errors import FsrlError
from fsrl.overrides import (COMPARISONS, MAX_CONDITIONS, MAX_FEATURE_OVERRIDES, MAX_RETURN_FEATURES,
                            OPS, Condition, FeatureOverride, validate_conditions, validate_overrides)
from fsrl.sae import Sae
from fsrl.sites import Site, attach

OP_CODE = {name: code for code, name in enumerate(OPS)}
NOOP = -1  # padding in the override table
OPS_READING_F = {"set", "scale", "ablate"}
NO_CONDITION = 0  # a condition's comparison code; COMPARISONS[c - 1] for c >= 1
COMPARISON_CODE = {name: code for code, name in enumerate(COMPARISONS, start=1)}


@dataclass(frozen=True)
class RowSteering:
    """One row's steering, as a request asks for it. Checked once (`check`), however many
    batches the row joins and leaves."""

    adapter: SteeringAdapter | None = None
    scale: float = 1.0
    overrides: Sequence[FeatureOverride] = ()
    steer_from: int = 0  # first steered position in the row's own sequence (prompt length: "generated")
    abort_when: Sequence[Condition] = ()  # the row stops at the first generated position one passes
    generated_from: int = 0  # the row's prompt length: positions from here on are generated
    _checked_for: list[int] = field(default_factory=list, init=False, repr=False, compare=False)

    @property
    def is_noop(self) -> bool:
        return (self.adapter is None or self.scale == 0.0) and not self.overrides and not self.abort_when

    def check(self, d_sae: int) -> "RowSteering":
        """Raise unless this row can steer an SAE `d_sae` features wide (the contract's override
        rules, the adapter's width); the answer is kept, so a row is checked once."""
        if d_sae not in self._checked_for:
            validate_overrides(self.overrides, d_sae)
            validate_conditions(self.overrides, self.abort_when, d_sae)
            if self.adapter is not None and self.adapter.config.d_sae != d_sae:
                raise FsrlError(f"adapter {self.adapter.id!r} has d_sae {self.adapter.config.d_sae}, "
                                f"SAE has {d_sae}")
            self._checked_for.append(d_sae)
        return self


@dataclass
class SteeringBatch:
    """Per-row steering of a batch, as tensors. Build it with `SteeringBatch.build`."""

    adapters: tuple[SteeringAdapter, ...]  # distinct adapters of this batch; a row points at one by slot
    adapter_slot: torch.Tensor          # (B,) long, -1: no adapter
    scale: torch.Tensor                 # (B,)
    clamp: torch.Tensor                 # (B,) bool, the row's adapter clamps g at zero
    override_index: torch.Tensor        # (B, M) long; padding points at column d_sae (a sink)
    override_op: torch.Tensor           # (B, M) long; padding is NOOP
    override_value: torch.Tensor        # (B, M)
    steer_from: torch.Tensor            # (B,) long
    row_active: torch.Tensor            # (B,) bool
    any_active: bool
    any_clamp: bool                     # some active row's adapter clamps
    any_override: bool
    needs_f: bool                       # some clamp or set/scale/ablate reads f
    capture_top: int = 0                # >0: report the top-|d| features at the last position
    row_adapters: Callable[[torch.Tensor], torch.Tensor] | None = None  # instead of `adapters`: v of each row
    slot_rows: tuple[torch.Tensor | None, ...] = ()  # per slot, its rows (long); None: every row
    # Conditions, as tensors like the overrides (comparison NO_CONDITION pads; index d_sae sinks).
    when_index: torch.Tensor | None = None       # (B, M) long: each override's condition feature
    when_comparison: torch.Tensor | None = None  # (B, M) long
    when_threshold: torch.Tensor | None = None   # (B, M)
    abort_index: torch.Tensor | None = None      # (B, A) long
    abort_comparison: torch.Tensor | None = None  # (B, A) long
    abort_threshold: torch.Tensor | None = None  # (B, A)
    generated_from: torch.Tensor | None = None   # (B,) long: each row's prompt length
    any_when: bool = False
    any_abort: bool = False
    telemetry: bool = False  # report, at the last position, what the steering did (`SteerOutput.telemetry`)

    @classmethod
    def build(cls, rows: Sequence[RowSteering], d_sae: int, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32, capture_top: int = 0, telemetry: bool = False) -> "SteeringBatch":
        adapters: list[SteeringAdapter] = []
        slots, clamps = [], []
        for row in rows:
            row.check(d_sae)
            if row.adapter is None:
                slots.append(-1)
                clamps.append(False)
                continue
            if not any(a is row.adapter for a in adapters):
                adapters.append(row.adapter)
            slots.append(next(i for i, a in enumerate(adapters) if a is row.adapter))
            clamps.append(row.adapter.clamp_nonnegative)
        width = max([len(r.overrides) for r in rows] + [1])
        index = torch.full((len(rows), width), d_sae, dtype=torch.long)
        op = torch.full((len(rows), width), NOOP, dtype=torch.long)
        value = torch.zeros((len(rows), width), dtype=dtype)
        for b, row in enumerate(rows):
            for m, o in enumerate(row.overrides):
                index[b, m], op[b, m], value[b, m] = o.index, OP_CODE[o.op], float(o.value)
        active = [not r.is_noop for r in rows]
        any_clamp = any(c and a for c, a in zip(clamps, active))
        slot_rows = tuple(None if all(s == k for s in slots) else
                          torch.tensor([b for b, s in enumerate(slots) if s == k], dtype=torch.long, device=device)
                          for k in range(len(adapters)))
        needs_f = any_clamp or any(o.op in OPS_READING_F for r in rows for o in r.overrides)
        when = _condition_table([[o.when for o in r.overrides] for r in rows], width, d_sae, dtype, device)
        abort = _condition_table([list(r.abort_when) for r in rows], max([len(r.abort_when) for r in rows] + [1]),
                                 d_sae, dtype, device)
        return cls(
            adapters=tuple(adapters),
            adapter_slot=torch.tensor(slots, dtype=torch.long, device=device),
            scale=torch.tensor([r.scale for r in rows], dtype=dtype, device=device),
            clamp=torch.tensor(clamps, dtype=torch.bool, device=device),
            override_index=index.to(device), override_op=op.to(device),
            override_value=value.to(device),
            steer_from=torch.tensor([r.steer_from for r in rows], dtype=torch.long, device=device),
            row_active=torch.tensor(active, dtype=torch.bool, device=device),
            any_active=any(active), any_clamp=any_clamp,
            any_override=any(r.overrides for r in rows), needs_f=needs_f, capture_top=capture_top,
            slot_rows=slot_rows, when_index=when[0], when_comparison=when[1], when_threshold=when[2],
            abort_index=abort[0], abort_comparison=abort[1], abort_threshold=abort[2],
            generated_from=torch.tensor([r.generated_from for r in rows], dtype=torch.long, device=device),
            any_when=any(o.when is not None for r in rows for o in r.overrides),
            any_abort=any(r.abort_when for r in rows), telemetry=telemetry)


def _condition_table(rows: Sequence[Sequence[Condition | None]], width: int, d_sae: int,
                     dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(index, comparison, threshold), each (B, width), of rows of conditions (None: none)."""
    index = torch.full((len(rows), width), d_sae, dtype=torch.long)
    comparison = torch.full((len(rows), width), NO_CONDITION, dtype=torch.long)
    threshold = torch.zeros((len(rows), width), dtype=dtype)
    for b, conditions in enumerate(rows):
        _write_conditions(index[b], comparison[b], threshold[b], conditions, d_sae)
    return index.to(device), comparison.to(device), threshold.to(device)


def _write_conditions(index: torch.Tensor, comparison: torch.Tensor, threshold: torch.Tensor,
                      conditions: Sequence[Condition | None], d_sae: int) -> None:
    """One row of a condition table, in place; the rest of the row is padding."""
    index.fill_(d_sae)
    comparison.fill_(NO_CONDITION)
    threshold.zero_()
    for m, c in enumerate(conditions):
        if c is not None:
            index[m], comparison[m], threshold[m] = c.index, COMPARISON_CODE[c.comparison], float(c.threshold)


class SteeringRows:
    """A steering batch of fixed size whose rows are set in place, for a decode step with
    static shapes (the steered model inside vLLM, fsrl.vllm_plugin). Every flag is on, the override table is
    MAX_FEATURE_OVERRIDES wide and the top MAX_RETURN_FEATURES are always captured, so `steer` runs the
    same code whatever the rows hold (one compiled graph), and each row gets what
    `SteeringBatch.build` would give it. An empty row is inactive: its residual is untouched."""

    def __init__(self, rows: int, sae: Sae, row_adapters, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        """`row_adapters`: what holds each row's adapter (`set_row(row, adapter)`, `tensors()`):
        in vLLM, each row's bank slot (`fsrl.vllm_plugin.site.SlotTable`)."""
        self.d_sae = sae.d_sae
        width = MAX_FEATURE_OVERRIDES
        self.batch = SteeringBatch(
            adapters=(), adapter_slot=torch.full((rows,), -1, dtype=torch.long, device=device),
            scale=torch.zeros(rows, dtype=dtype, device=device),
            clamp=torch.zeros(rows, dtype=torch.bool, device=device),
            override_index=torch.full((rows, width), self.d_sae, dtype=torch.long, device=device),
            override_op=torch.full((rows, width), NOOP, dtype=torch.long, device=device),
            override_value=torch.zeros(rows, width, dtype=dtype, device=device),
            steer_from=torch.zeros(rows, dtype=torch.long, device=device),
            row_active=torch.zeros(rows, dtype=torch.bool, device=device),
            any_active=True, any_clamp=True, any_override=True, needs_f=True,
            capture_top=min(MAX_RETURN_FEATURES, self.d_sae),
            row_adapters=row_adapters,
            when_index=torch.full((rows, width), self.d_sae, dtype=torch.long, device=device),
            when_comparison=torch.full((rows, width), NO_CONDITION, dtype=torch.long, device=device),
            when_threshold=torch.zeros(rows, width, dtype=dtype, device=device),
            abort_index=torch.full((rows, MAX_CONDITIONS), self.d_sae, dtype=torch.long, device=device),
            abort_comparison=torch.full((rows, MAX_CONDITIONS), NO_CONDITION, dtype=torch.long, device=device),
            abort_threshold=torch.zeros(rows, MAX_CONDITIONS, dtype=dtype, device=device),
            generated_from=torch.zeros(rows, dtype=torch.long, device=device),
            any_when=True, any_abort=True, telemetry=True)

    TABLE = ("scale", "clamp", "override_index", "override_op", "override_value", "steer_from",
             "row_active", "when_index", "when_comparison", "when_threshold", "abort_index",
             "abort_comparison", "abort_threshold", "generated_from")  # the per-row tensors

    def tensors(self) -> list[torch.Tensor]:
        return [*(getattr(self.batch, name) for name in self.TABLE), *self.batch.row_adapters.tensors()]

    def set_row(self, row: int, steering: RowSteering | None) -> None:
        """Row `row` steers as `steering` asks (None: empty, untouched)."""
        if steering is not None:
            steering.check(self.d_sae)
        b = self.batch
        adapter = steering.adapter if steering is not None else None
        b.row_adapters.set_row(row, adapter)
        b.scale[row] = steering.scale if steering is not None else 0.0
        b.clamp[row] = adapter is not None and adapter.clamp_nonnegative
        b.steer_from[row] = steering.steer_from if steering is not None else 0
        b.row_active[row] = steering is not None and not steering.is_noop
        b.override_index[row] = self.d_sae
        b.override_op[row] = NOOP
        b.override_value[row] = 0.0
        overrides = steering.overrides if steering is not None else ()
        for m, o in enumerate(overrides):
            b.override_index[row, m], b.override_op[row, m] = o.index, OP_CODE[o.op]
            b.override_value[row, m] = float(o.value)
        _write_conditions(b.when_index[row], b.when_comparison[row], b.when_threshold[row],
                          [o.when for o in overrides], self.d_sae)
        _write_conditions(b.abort_index[row], b.abort_comparison[row], b.abort_threshold[row],
                          steering.abort_when if steering is not None else (), self.d_sae)
        b.generated_from[row] = steering.generated_from if steering is not None else 0


@dataclass
class SteerOutput:
    x: torch.Tensor                             # (B, T, d_in) steered residual
    delta: torch.Tensor | None                  # (B, T, d_sae) d = g - f, zero where unsteered
    top_index: torch.Tensor | None = None       # (B, K) top-|d| features at the last position
    top_delta: torch.Tensor | None = None       # (B, K)
    v: torch.Tensor | None = None               # (B, T, d_sae) each row's adapter output v (before
                                                # scale, clamp, overrides); 0 where unsteered
    fired: torch.Tensor | None = None           # (B, T) long: the feature of the first abort
                                                # condition that passes at a generated position, -1: none
    telemetry: "Telemetry | None" = None        # with batch.telemetry: the last position's


@dataclass
class Telemetry:
    """What the steering did at each row's last position (the one that predicts the next token)."""

    norm: torch.Tensor         # (B,) L2 norm of x' - x, the steering vector in the residual stream
    pushed: torch.Tensor       # (B,) long: features with d != 0
    when_passed: torch.Tensor  # (B, M) bool: overrides whose `when` condition passed there


def _features_at(sae: Sae, x: torch.Tensor, index: torch.Tensor, full: torch.Tensor | None) -> torch.Tensor:
    """f at the override indices: (B, T, M). Padding (index d_sae) reads 0."""
    B, T, _ = x.shape
    safe = index.clamp(max=sae.d_sae - 1)                                      # (B, M)
    if full is None and sae.architecture != "topk":
        # Element-wise SAE: encode only the M overridden features of each row.
        x_in = x - sae.b_dec if sae.apply_b_dec_to_input else x
        pre = torch.einsum("btd,bmd->btm", x_in, sae.W_enc.T[safe]) + sae.b_enc[safe][:, None, :]
        if sae.architecture == "jumprelu":
            f_sel = pre * (pre > sae.threshold[safe][:, None, :])
        else:
            f_sel = torch.relu(pre)
    elif full is not None:
        f_sel = full.gather(-1, safe[:, None, :].expand(B, T, -1))
    else:
        # Top-k SAE: f_i is pre_i where pre_i is among the k largest (and positive), else 0.
        # Reading the k-th largest pre-activation avoids building the full f.
        x_in = x - sae.b_dec if sae.apply_b_dec_to_input else x
        pre = sae.pre_activations(x_in)                                        # (B, T, d_sae)
        kth = pre.topk(sae.k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
        pre_sel = pre.gather(-1, safe[:, None, :].expand(B, T, -1))
        f_sel = torch.where(pre_sel >= kth, pre_sel.relu(), torch.zeros_like(pre_sel))
    return f_sel.masked_fill((index == sae.d_sae)[:, None, :], 0.0)


def steer(x: torch.Tensor, sae: Sae, batch: SteeringBatch, positions: torch.Tensor,
          keep_delta: bool = False, keep_v: bool = False) -> SteerOutput:
    """Apply the steering of `batch` to the residual `x` at `positions`.

    x: (B, T, d_in); positions: (B, T) long, each token's index in its row's own sequence
    (-1 for padding, which is never steered). keep_delta / keep_v: also return d = g - f / the
    adapters' v (training reads v for its L1 penalty; both stay differentiable).
    """
    if not batch.any_active:
        return SteerOutput(x=x, delta=None)
    B, T, _ = x.shape
    d_sae = sae.d_sae
    xs = x.to(sae.W_dec.dtype)
    steered = batch.row_active[:, None] & (positions >= batch.steer_from[:, None])  # (B, T)

    d, v_rows = _adapter_pushes(xs, batch, d_sae, keep_v)

    full_f = sae.encode(xs) if batch.any_clamp else None
    if batch.any_clamp:
        clamped = torch.relu(full_f + d) - full_f                                     # g = relu(f + s v)
        d = torch.where(batch.clamp[:, None, None], clamped, d)

    if batch.any_override:
        index = batch.override_index                                                  # (B, M)
        idx = index[:, None, :].expand(B, T, -1)                                      # (B, T, M)
        d_ext = F.pad(d, (0, 1))                                                      # sink column
        d_sel = d_ext.gather(-1, idx)
        f_sel = _features_at(sae, xs, index, full_f) if batch.needs_f else torch.zeros_like(d_sel)
        op = batch.override_op[:, None, :]
        value = batch.override_value[:, None, :].to(xs.dtype)
        new = torch.where(op == OP_CODE["set"], value - f_sel, d_sel)
        new = torch.where(op == OP_CODE["add"], d_sel + value, new)
        new = torch.where(op == OP_CODE["scale"], (f_sel + d_sel) * value - f_sel, new)
        new = torch.where(op == OP_CODE["ablate"], -f_sel, new)
        new = torch.where(op == OP_CODE["unsteer"], torch.zeros_like(new), new)
        if batch.any_when:  # an override with a condition changes d only where it passes
            passed = _passes(_features_at(sae, xs, batch.when_index, full_f), batch.when_comparison,
                             batch.when_threshold)                                    # (B, T, M)
            new = torch.where(passed | (batch.when_comparison == NO_CONDITION)[:, None, :], new, d_sel)
        d = d_ext.scatter(-1, idx, new)[..., :d_sae]

    d = torch.where(steered[..., None], d, 0.0)
    x_out = torch.where(steered[..., None], (xs + _decode_delta(d, sae)).to(x.dtype), x)

    out = SteerOutput(x=x_out, delta=d if keep_delta else None,
                      v=torch.where(steered[..., None], v_rows, 0.0) if keep_v else None)
    if batch.telemetry:
        last = (x_out[:, -1, :].to(xs.dtype) - xs[:, -1, :])
        passed_last = (passed[:, -1, :] if batch.any_override and batch.any_when
                       else torch.zeros_like(batch.override_op, dtype=torch.bool))
        out.telemetry = Telemetry(norm=last.norm(dim=-1), pushed=(d[:, -1, :] != 0).sum(-1),
                                  when_passed=passed_last & steered[:, -1:])
    if batch.any_abort:
        fires = _passes(_features_at(sae, xs, batch.abort_index, full_f), batch.abort_comparison,
                        batch.abort_threshold)                                        # (B, T, A)
        fires = fires & (positions >= batch.generated_from[:, None])[..., None]
        first = fires.long().argmax(-1, keepdim=True)                                 # first that passes
        index = batch.abort_index[:, None, :].expand(B, T, -1).gather(-1, first)[..., 0]
        out.fired = torch.where(fires.any(-1), index, -1)
    if batch.capture_top > 0:
        last = d[:, -1, :]                                                            # (B, d_sae)
        top = last.abs().topk(min(batch.capture_top, d_sae), dim=-1)
        out.top_index, out.top_delta = top.indices, last.gather(-1, top.indices)
    return out


def _passes(f: torch.Tensor, comparison: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Where each condition passes: f (B, T, M) against (B, M) comparisons and thresholds
    (NO_CONDITION never passes)."""
    c, t = comparison[:, None, :], threshold[:, None, :].to(f.dtype)
    return ((c == COMPARISON_CODE["above"]) & (f > t)) | ((c == COMPARISON_CODE["below"]) & (f < t))


def first_fired(fired: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B,): each row's fired feature at its first position that fired, -1: none."""
    has = fired >= 0
    at = has.long().argmax(-1, keepdim=True)
    return torch.where(has.any(-1), fired.gather(-1, at)[:, 0], -1)


def _adapter_pushes(xs: torch.Tensor, batch: SteeringBatch, d_sae: int, keep_v: bool
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """d = s_b * v_b for every row (0 where a row has no adapter), and each row's v when
    `keep_v` (or when it comes for free). Each distinct adapter runs on its own rows only
    (gathered, then scattered back), so the cost follows rows, not adapters x rows, and a row's
    push never touches another's (one adapter's inf cannot reach another row)."""
    if batch.row_adapters is not None:  # every row through its own weights (a static batch)
        v = batch.row_adapters(xs).to(xs.dtype)                                       # (B, T, d_sae)
        return batch.scale[:, None, None] * v, v
    B, T, _ = xs.shape
    d = xs.new_zeros(B, T, d_sae)
    v_rows = xs.new_zeros(B, T, d_sae) if keep_v else None
    for slot, adapter in enumerate(batch.adapters):
        rows = batch.slot_rows[slot]
        if rows is None:  # one adapter on every row (training, or a batch of one adapter)
            v = adapter(xs).to(xs.dtype)                                              # (B, T, d_sae)
            return batch.scale[:, None, None] * v, v
        v = adapter(xs.index_select(0, rows)).to(xs.dtype)                           # (n, T, d_sae)
        # index_copy, not in place: training differentiates through it.
        d = d.index_copy(0, rows, batch.scale.index_select(0, rows)[:, None, None] * v)
        if keep_v:
            v_rows = v_rows.index_copy(0, rows, v)
    return d, v_rows


def _decode_delta(d: torch.Tensor, sae: Sae) -> torch.Tensor:
    """d @ W_dec: through the packed decoder when the SAE has one (serving on a CPU), else
    reading only the decoder rows that d touches (on the CPU).

    On CUDA the dense product stays: counting nonzeros would stall the stream, and a dense
    read of W_dec is a few percent of a step there (DESIGN.md, performance model). Training takes
    it too: a feature where d is zero still has a gradient (a constant push starts at b = 0), and
    the product is a small part of a training step.
    """
    if sae.packed_decoder is not None and sae.packed_decoder.applies_to(d):
        return sae.packed_decoder(d)
    W_dec = sae.W_dec
    if d.is_cuda or d.requires_grad or torch.compiler.is_compiling():
        return d @ W_dec
    flat = d.reshape(-1, d.shape[-1])                                                 # (B*T, d_sae)
    nnz = int(flat.count_nonzero())
    if nnz * 4 > flat.numel():
        return d @ W_dec
    # Inference: a sparse-dense product reads each row's own nonzeros, no copy of W_dec.
    return torch.sparse.mm(flat.to_sparse(), W_dec).reshape(*d.shape[:-1], W_dec.shape[-1])


@dataclass
class StepCapture:
    """What one forward under steering reports back (top features at the last position)."""

    top_index: torch.Tensor | None = None
    top_delta: torch.Tensor | None = None
    v: torch.Tensor | None = None  # (B, T, d_sae) the adapters' v, when steering(keep_v=True)
    fired: torch.Tensor | None = None  # (B,) the abort condition's feature that fired, -1: none
    telemetry: Telemetry | None = None  # with batch.telemetry, when some row steered


class SteeringHook:
    """Attaches `steer` to the residual stream at the SAE's site (`fsrl.sites.attach`: the
    input of a layer for resid_pre, its output for resid_post).

    Use `with hook.steering(batch, positions) as capture: model(...)`. Outside that block the
    hook is a no-op, so the plain model is the base model.
    """

    def __init__(self, layers: nn.ModuleList, site: Site, sae: Sae):
        self.site, self.sae = site, sae
        self._batch: SteeringBatch | None = None
        self._positions: torch.Tensor | None = None
        self._capture: StepCapture | None = None
        self._keep_v = False
        self._handle = attach(layers, site, self._steer)

    @property
    def layer(self) -> int:
        return self.site.layer

    def _steer(self, hidden: torch.Tensor) -> torch.Tensor | None:
        if self._batch is None or not self._batch.any_active:
            return None
        result = steer(hidden, self.sae, self._batch, self._positions, keep_v=self._keep_v)
        if self._capture is not None:
            self._capture.top_index, self._capture.top_delta = result.top_index, result.top_delta
            self._capture.v = result.v
            self._capture.fired = first_fired(result.fired) if result.fired is not None else None
            self._capture.telemetry = result.telemetry
        return result.x

    @contextlib.contextmanager
    def steering(self, batch: SteeringBatch | None, positions: torch.Tensor | None,
                 keep_v: bool = False) -> Iterator[StepCapture]:
        self._batch, self._positions, self._capture = batch, positions, StepCapture()
        self._keep_v = keep_v
        try:
            yield self._capture
        finally:
            self._batch = self._positions = self._capture = None
            self._keep_v = False

    def remove(self) -> None:
        self._handle.remove()
