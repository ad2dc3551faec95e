"""The steered model vLLM builds: vLLM's own class for the model's family, whose decoder layer
at the SAE's site (its input or its output) steers through a `SteeringSite`.

Everything the compiled graph reads is a registered buffer of fixed shape, allocated when the
model is built and written in place between steps (never reassigned), so the graph compiled
once keeps reading the current values:

    bank          the adapters' weights stacked in slots (`AdapterBank`: K x d_in x d_sae, ...)
    table         one row per steered request (`fsrl.steering.SteeringRows`: scale, clamp,
                  override index / op / value, steer_from, active) plus `table_slot` (its bank
                  slot); the last row is never written: an unsteered token points at it
    token_row     (max tokens,) the table row of each token of the step
    capture_*     (max tokens, k) with `capture_top` k > 0: each token's top steered features
                  (index, delta), written by the graph; `step.collect_features` keeps those of
                  the positions that predict a token, for requests that ask
    capture_norm, capture_pushed, capture_when  (max tokens, ...) each token's telemetry (the
                  steering's norm, features pushed, `when`s passed), written by the graph
    capture_fired (max tokens,) the feature of the abort condition that passed at each token
                  (-1: none), written by the graph; `step.collect_fired` keeps the first of a
                  request that has `abort_when`

The forward gathers per-token views of the table and calls `fsrl.steering.steer` with one
"row" per token (B = tokens, T = 1), each token's position from vLLM's own `positions`.
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch import nn
from vllm.config import VllmConfig

from fsrl.adapter import RowAdapters, SteeringAdapter, load_adapter
from fsrl.errors import FsrlError
from fsrl.overrides import MAX_FEATURE_OVERRIDES
from fsrl.sae import Sae, load_sae
from fsrl.steering import SteeringBatch, SteeringRows, steer
from fsrl.vllm_engine import CONFIG_KEY, COUNTERS, PREFIX, STEERABLE_ARCHITECTURES
from fsrl.vllm_engine.step import install_runner_hook

log = logging.getLogger(__name__)


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


class _BankPush:
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
        self.adapters: dict[str, SteeringAdapter] = {}  # id -> host copy (RowSteering names it)
        self.slot_of: dict[int, int] = {}
        self.empty_row = table_rows                      # never written: unsteered tokens
        self.slots = SlotTable(table_rows + 1, self.slot_of, device=device)  # SteeringRows.set_row writes the slot
        self.table = SteeringRows(table_rows + 1, sae, device=device or "cpu", dtype=dtype,
                                  row_adapters=self.slots)
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
            needs_f=True, capture_top=self.capture_top, row_adapters=_BankPush(self.bank, slot),
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


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a vLLM causal LM (`model.layers` in the families fsrl steers)."""
    for path in ("model.layers", "model.language_model.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return obj
    raise FsrlError(f"cannot find the decoder layers of vLLM's {type(model).__name__}")


_STEERED_LAYERS: dict[type, type] = {}
LAYER_ARGS = ["positions", "hidden_states", "residual"]


def steered_layer_class(layer_cls: type) -> type:
    """`layer_cls` with steering on its input (resid_pre) or its output (resid_post).

    vLLM's layers pass (hidden, residual) along, whose sum is the residual stream (what the SAE
    reads, and what transformers' layers pass); residual is None before the first layer.
    resid_pre: the steered stream goes in as (x', None), which the layer reads as the stream
    itself. resid_post: the layer returns (steered stream, 0), so the next layer's fused add
    reads the steered stream exactly (x' + 0 = x', and h + r is the same single add either way)."""
    if layer_cls in _STEERED_LAYERS:
        return _STEERED_LAYERS[layer_cls]
    takes = list(inspect.signature(layer_cls.forward).parameters)[1:4]
    if takes != LAYER_ARGS:
        raise FsrlError(f"cannot steer vLLM's {layer_cls.__name__}: it takes ({', '.join(takes)}), "
                        f"not ({', '.join(LAYER_ARGS)})")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None, *args, **kwargs):
        if self.fsrl_steers_input:
            stream = hidden_states if residual is None else hidden_states + residual
            return layer_cls.forward(self, positions, self.fsrl_site(stream, positions), None, *args, **kwargs)
        hidden_states, residual = layer_cls.forward(self, positions, hidden_states, residual, *args, **kwargs)
        x = self.fsrl_site(hidden_states + residual, positions)
        return x, torch.zeros_like(x)

    steered = type(f"FsrlSteered{layer_cls.__name__}", (layer_cls,), {"forward": forward})
    _STEERED_LAYERS[layer_cls] = steered
    return steered


class SteeredModel:
    """Mixed in before one of vLLM's causal LM classes (`steered_model_class`): the decoder
    layer at the site `hf_config.fsrl_steering` names (see
    `fsrl.vllm_engine.steered_llm_kwargs`) becomes its steered form, holding a `SteeringSite`."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        spec = getattr(vllm_config.model_config.hf_config, CONFIG_KEY, None)
        if not spec:
            raise FsrlError(f"{type(self).__name__} needs hf_overrides[{CONFIG_KEY!r}]")
        sched = vllm_config.scheduler_config
        sae = load_sae(spec["sae_dir"])
        site_at = sae.site_at(int(spec["layer"]))  # the SAE's own kind of site, at the layer asked
        max_tokens = max(sched.max_num_batched_tokens, sched.max_num_seqs)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        site = SteeringSite(sae, bank_slots=int(spec.get("bank_slots", 4)),
                            table_rows=int(spec.get("table_rows") or sched.max_num_seqs),
                            max_tokens=max_tokens, capture_top=int(spec.get("capture_top", 0)))
        layers = decoder_layers(self)
        if not 0 <= site_at.layer < len(layers):
            raise FsrlError(f"site {site_at} is out of range: the model has {len(layers)} layers")
        block = layers[site_at.layer]
        block.__class__ = steered_layer_class(type(block))
        block.fsrl_site = site
        block.fsrl_steers_input = site_at.kind == "resid_pre"
        for adapter_id, folder in spec.get("adapters", {}).items():
            site.load_adapter(adapter_id, load_adapter(folder, sae=sae, layer=site_at.layer))
        self.fsrl_layer = site_at.layer
        install_runner_hook()

    @property
    def fsrl_site(self) -> SteeringSite:
        return decoder_layers(self)[self.fsrl_layer].fsrl_site


def steered_model_class(architecture: str) -> type:
    """vLLM's class for `architecture`, steered."""
    from vllm import ModelRegistry

    base = ModelRegistry._try_load_model_cls(architecture)
    if base is None:
        raise FsrlError(f"vLLM cannot load the {architecture} architecture")
    return type(PREFIX + architecture, (SteeredModel, base), {"__module__": __name__})


def __getattr__(name: str) -> type:
    """vLLM loads `fsrl.vllm_engine.model:FsrlSteered<Arch>` (registered by
    `fsrl.vllm_engine.register`): the class is made on first use."""
    if name.startswith(PREFIX) and name[len(PREFIX):] in STEERABLE_ARCHITECTURES:
        globals()[name] = cls = steered_model_class(name[len(PREFIX):])
        return cls
    raise AttributeError(name)
