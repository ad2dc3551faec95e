"""The steering site inside vLLM's model, as plain torch (no vLLM import, so it runs and is
tested anywhere): the SAE, the adapter bank, the per-request table and the per-token row index of
one decoder layer, every tensor a registered buffer of fixed shape written in place between
steps (fsrl.vllm_plugin.model puts it in vLLM's layer; fsrl.vllm_plugin.step fills it).

    bank          the adapters' weights stacked in slots (`AdapterBank`: K x d_in x d_sae, ...)
    table         one row per steered request (`fsrl.steering.SteeringRows`: scale, clamp,
                  override index / op / value and conditions, abort conditions, steer_from,
                  active) plus its bank slot (`SlotTable`); the last row is never written: an
                  unsteered token points at it
    token_row     (max tokens,) the table row of each token of the step
    capture_*     what the graph writes for each token: its top steered features (index, delta)
                  with `capture_top` k > 0, the abort condition that passed (`capture_fired`),
                  its telemetry (norm, features pushed, `when`s passed)

The forward gathers per-token views of the table and calls `fsrl.steering.steer` with one
"row" per token (B = tokens, T = 1), each token's position from vLLM's own `positions`.
"""

from __future__ import annotations

import torch
from torch import nn

from fsrl.adapter import RowAdapters, SteeringAdapter
from fsrl.errors import FsrlError
from fsrl.overrides import MAX_FEATURE_OVERRIDES
from fsrl.sae import Sae
from fsrl.steering import SteeringBatch, SteeringRows, steer
from fsrl.vllm_plugin import COUNTERS


class AdapterBank(RowAdapters, nn.Module):
    """K adapter slots, stacked: `RowAdapters`' tensors and maths with one row per slot (not
    per batch row), as buffers. `set_row(slot, adapter)` loads a slot in place; `by_slot`
    runs each token through its slot's adapter."""

    def __init__(self, slots: int, d_in: int, d_sae: int, device=None, dtype=torch.float32):
        nn.Module.__init__(self)
        RowAdapters.__init__(self, slots, d_in, d_sae, device=device or "cpu", dtype=dtype)
        for name in ("W", "b", "b_in", "tau", "soft_threshold"):
            self.register_buffer(name, self.__dict__.pop(name))


class SlotTable(nn.Module):
    """What `SteeringRows` holds as its rows' adapters: each request row's bank slot (-1: none).
    `set_row` is called by `SteeringRows.set_row` with the row's adapter."""

    def __init__(self, rows: int, slot_of: dict[int, int], device=None):
        super().__init__()
        self.register_buffer("slot", torch.full((rows,), -1, dtype=torch.long, device=device))
        self.slot_of = slot_of  # id(adapter object) -> bank slot

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.slot,)

    def set_row(self, row: int, adapter: SteeringAdapter | None) -> None:
        if adapter is None:
            self.slot[row] = -1
        elif id(adapter) not in self.slot_of:
            raise FsrlError(f"adapter {adapter.id!r} is not in the bank")
        else:
            self.slot[row] = self.slot_of[id(adapter)]


class BankPush:
    """`SteeringBatch.row_adapters` for a batch of tokens: v of each token from its bank slot
    (`RowAdapters.by_slot`: each slot in use on its own tokens). xs (N, 1, d_in) -> v (N, 1, d_sae)."""

    def __init__(self, bank: AdapterBank, slot: torch.Tensor):
        self.bank, self.slot = bank, slot

    def __call__(self, xs: torch.Tensor) -> torch.Tensor:
        return self.bank.by_slot(xs[:, 0, :], self.slot)[:, None, :]


class SteeringSite(nn.Module):
    """The SAE, the adapter bank, the request table and the per-token row index of one layer."""

    def __init__(self, sae: Sae, bank_slots: int, table_rows: int, max_tokens: int,
                 device=None, dtype=torch.float32, capture_top: int = 0):
        super().__init__()
        self.capture_top = capture_top
        k = max(capture_top, 1)
        self.register_buffer("capture_index", torch.zeros((max_tokens, k), dtype=torch.long, device=device))
        self.register_buffer("capture_delta", torch.zeros((max_tokens, k), dtype=dtype, device=device))
        self.features: dict[str, list[list[tuple[int, float]]]] = {}  # request key -> per token
        self.register_buffer("capture_fired", torch.full((max_tokens,), -1, dtype=torch.long, device=device))
        # Telemetry of each token's position: steering norm, features pushed, `when`s that passed.
        self.register_buffer("capture_norm", torch.zeros((max_tokens,), dtype=dtype, device=device))
        self.register_buffer("capture_pushed", torch.zeros((max_tokens,), dtype=torch.long, device=device))
        self.register_buffer("capture_when", torch.zeros((max_tokens, MAX_FEATURE_OVERRIDES), dtype=torch.bool,
                                                         device=device))
        self.fired: dict[str, tuple[int, int]] = {}  # request key -> (feature, generated tokens kept)
        self.sae = sae
        self.bank = AdapterBank(bank_slots, sae.d_in, sae.d_sae, device=device, dtype=dtype)
        self.host: dict[str, SteeringAdapter] = {}      # key -> every loaded version, in host memory
        self.adapters: dict[str, SteeringAdapter] = {}  # key -> the versions in the bank (RowSteering names them)
        self.slot_of: dict[int, int] = {}
        self.empty_row = table_rows                      # never written: unsteered tokens
        self.slots = SlotTable(table_rows + 1, self.slot_of, device=device)  # SteeringRows.set_row writes the slot
        self.table = SteeringRows(table_rows + 1, sae, self.slots, device=device or "cpu", dtype=dtype)
        for name in SteeringRows.TABLE:
            self.register_buffer(f"table_{name}", getattr(self.table.batch, name))
        self.register_buffer("token_row", torch.full((max_tokens,), self.empty_row, dtype=torch.long,
                                                     device=device))
        self.request_rows: dict[str, int] = {}           # request id -> table row (host side)

    def load_adapter(self, adapter_id: str, adapter: SteeringAdapter) -> int:
        """Put `adapter` in a free bank slot (in place); returns the slot."""
        if adapter_id in self.adapters:
            raise FsrlError(f"adapter {adapter_id!r} is already in the bank")
        used = set(self.slot_of.values())
        free = [k for k in range(self.bank.W.shape[0]) if k not in used]
        if not free:
            raise FsrlError("the adapter bank is full")
        self.bank.set_row(free[0], adapter)
        self.adapters[adapter_id] = adapter
        self.slot_of[id(adapter)] = free[0]
        return free[0]

    def unload_adapter(self, adapter_id: str) -> None:
        """Free `adapter_id`'s bank slot (zeroed in place). The caller makes sure no running
        request names it any more."""
        adapter = self.adapters.pop(adapter_id, None)
        if adapter is None:
            raise FsrlError(f"adapter {adapter_id!r} is not in the bank")
        self.bank.set_row(self.slot_of.pop(id(adapter)), None)

    def keep(self, key: str, adapter: SteeringAdapter) -> None:
        """Hold a loaded version in host memory, out of the bank until `page` seats it."""
        if key in self.host:
            raise FsrlError(f"adapter {key!r} is already loaded")
        self.host[key] = adapter

    def page(self, evict: list[str], page_in: list[str]) -> None:
        """Send versions out of their bank slots (their host copies stay), then copy versions
        in from their host copies (in place, between steps: no running request names any of
        `evict`)."""
        missing = [key for key in page_in if key not in self.host]
        if missing:
            raise FsrlError(f"adapter {missing[0]!r} is not loaded on this worker")
        for key in evict:
            self.unload_adapter(key)
        for key in page_in:
            self.load_adapter(key, self.host[key])

    def drop(self, key: str) -> None:
        """Forget a version: its host copy, and its bank slot if it holds one."""
        self.host.pop(key, None)
        if key in self.adapters:
            self.unload_adapter(key)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: (N, d_in) the residual stream after the layer, one row per token of the step;
        positions: (N,) each token's position in its own request."""
        if not torch.compiler.is_compiling():
            COUNTERS["eager_site_forwards"] += 1
        n = x.shape[0]
        row = self.token_row[:n]
        slot = self.slots.slot[row]
        batch = SteeringBatch(
            adapters=(), adapter_slot=slot, any_active=True, any_clamp=True, any_override=True,
            needs_f=True, capture_top=self.capture_top, row_adapters=BankPush(self.bank, slot),
            any_when=True, any_abort=True, telemetry=True,
            **{name: getattr(self, f"table_{name}")[row] for name in SteeringRows.TABLE})
        out = steer(x[:, None, :], self.sae, batch, positions[:, None])
        if self.capture_top:  # one "row" per token: its own top features
            self.capture_index[:n].copy_(out.top_index)
            self.capture_delta[:n].copy_(out.top_delta)
        self.capture_fired[:n].copy_(out.fired[:, 0])
        self.capture_norm[:n].copy_(out.telemetry.norm)
        self.capture_pushed[:n].copy_(out.telemetry.pushed)
        self.capture_when[:n].copy_(out.telemetry.when_passed)
        return out.x[:, 0, :]
