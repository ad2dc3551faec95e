"""Faster CPU inference: linear weights packed once for oneDNN.

On a CPU a decode step is a few rows times every weight matrix, so it is bound by reading the
weights. Through the default BLAS path a batch of 2 rows cost 1.6-1.8x a batch of 1 on the
project's 2-core machine (the weights are repacked at every call); with the weights packed once
into oneDNN's blocked layout, 2 or 4 rows cost about what 1 row costs and 8 rows about 1.3x
(BENCHMARKS.md, the serving section). That is what makes batching, and an A/B compare's second
row, cheap on a CPU. `PackedLinear` does it for the model's layers, `PackedMatrix` for the
steering's own products (adapter, SAE encoder and decoder).

Inference only: the packed matrix multiply has no backward, so training never packs.

Bounded shapes: oneDNN builds (and caches) a primitive for every distinct row count a packed
weight is multiplied with, and memory grew with each new one (three layers fed random row counts
from 1 to 700: 244 MB to 1,357 MB of RSS after 3,000 calls, still rising). Prefills bring as
many row counts as there are prompt lengths, and a draining batch brings every decode row
count. So a packed product rounds its rows up to one of `SMALL_ROW_COUNTS` (up to 32), and
larger inputs run in chunks of `CHUNK_ROWS` rows, each rounded up to a multiple of `ROW_STEP`:
17 shapes per weight, whatever the prompts. Padding is not free (a decode step of 13 rows
padded to 16 took 16-20 % longer), but with every row count from 1 to 16 allowed, the load
test's memory still rose when its batch drained (BENCHMARKS.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Rows the packed layout is tuned for; any number of rows works (prefill included).
DEFAULT_BATCH_HINT = 16
# The row counts a packed product runs with (module docstring).
SMALL_ROW_COUNTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
CHUNK_ROWS = 256
ROW_STEP = 32


def _packable(weight: torch.Tensor) -> bool:
    """Float32 on the CPU, with oneDNN's packed linear present in this torch."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


# For 0..32 rows, the row count each is padded to.
_SMALL_PADDED = [next(count for count in SMALL_ROW_COUNTS if count >= rows)
                 for rows in range(SMALL_ROW_COUNTS[-1] + 1)]


def _padded_to(rows: torch.Tensor, count: int) -> torch.Tensor:
    return F.pad(rows, (0, 0, 0, count - rows.shape[0])) if count > rows.shape[0] else rows


def packed_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`x @ weight.T + bias` for a weight from `_reorder_linear_weight`, over a few row counts."""
    def product(rows: torch.Tensor, count: int) -> torch.Tensor:
        out = torch.ops.mkldnn._linear_pointwise(_padded_to(rows, count), weight, bias, "none", [], "")
        return out[:rows.shape[0]] if count > rows.shape[0] else out
    flat = x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    if rows <= SMALL_ROW_COUNTS[-1]:  # a decode step: one call, as few copies as can be
        out = product(flat, _SMALL_PADDED[rows])
    else:
        out = torch.cat([product(chunk, -(-chunk.shape[0] // ROW_STEP) * ROW_STEP)
                         for chunk in flat.split(CHUNK_ROWS)])
    return out.reshape(*x.shape[:-1], out.shape[-1])


class PackedLinear(nn.Module):
    """An `nn.Linear` whose weight lives in oneDNN's blocked layout (CPU, float32, no grad)."""

    def __init__(self, linear: nn.Linear, batch_hint: int = DEFAULT_BATCH_HINT):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint),
                             persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("PackedLinear is for inference; it has no backward")
        return packed_product(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


class PackedMatrix:
    """`x @ matrix + bias` for a fixed (d_in, d_out) matrix, packed once for oneDNN.

    For the steering's own products (adapter, SAE encoder and decoder), which a batch of rows
    would otherwise pay the repacking for at every step. Immutable: copies share it. It keeps
    the tensors it was packed from (references, no copy) to tell when a gradient is wanted.
    """

    def __init__(self, matrix: torch.Tensor, bias: torch.Tensor | None = None,
                 batch_hint: int = DEFAULT_BATCH_HINT):
        weight = matrix.detach().t().contiguous()  # (d_out, d_in), as nn.Linear keeps it
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
        self.bias = None if bias is None else bias.detach().clone()
        self._sources = (matrix,) if bias is None else (matrix, bias)

    @staticmethod
    def available_for(matrix: torch.Tensor) -> bool:
        return _packable(matrix)

    def applies_to(self, x: torch.Tensor) -> bool:
        """Whether `x` can go through it: float32 on the CPU, and no gradient wanted, neither
        for `x` nor for the weights it was packed from (the packed product has no backward)."""
        return (x.device.type == "cpu" and x.dtype == torch.float32
                and not (torch.is_grad_enabled()
                         and any(t.requires_grad for t in (x, *self._sources))))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return packed_product(x, self.weight, self.bias)

    def __deepcopy__(self, memo: dict) -> "PackedMatrix":
        return self


def can_pack(model: nn.Module) -> bool:
    """Whether `pack_linear_layers` applies: float32 weights on the CPU, with oneDNN present."""
    p = next(model.parameters(), None)
    return p is not None and _packable(p)


def pack_linear_layers(model: nn.Module, batch_hint: int = DEFAULT_BATCH_HINT) -> int:
    """Replace every `nn.Linear` in `model` by a `PackedLinear`, in place; returns how many.

    A weight tied to an embedding (the output head of many small models) gets a packed copy;
    the embedding keeps its own. Does nothing (returns 0) when `can_pack(model)` is false.
    """
    if not can_pack(model):
        return 0
    targets = [(name, module) for name, module in model.named_modules() if type(module) is nn.Linear]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PackedLinear(linear, batch_hint))
    # The weights may be views of a memory-mapped checkpoint file; one left in the file (the
    # embedding, the norms) keeps all of it mapped. Copies let the mapping go.
    for param in model.parameters():
        param.data = param.data.clone()
    return len(targets)
