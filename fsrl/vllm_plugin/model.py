"""The steered model vLLM builds: vLLM's own class for the model's family, whose decoder layer
at the SAE's site (its input or its output) steers through a `SteeringSite`.

What the graph reads and writes there is `fsrl.vllm_plugin.site.SteeringSite` (plain torch:
its buffers, sized once, written in place between steps).
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch import nn
from vllm.config import VllmConfig

from fsrl.adapter import load_adapter
from fsrl.errors import FsrlError
from fsrl.sae import load_sae
from fsrl.vllm_plugin import CONFIG_KEY, PREFIX, STEERABLE_ARCHITECTURES
from fsrl.vllm_plugin.site import SteeringSite
from fsrl.vllm_plugin.step import install_runner_hook

log = logging.getLogger(__name__)


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
    `fsrl.vllm_plugin.steered_llm_kwargs`) becomes its steered form, holding a `SteeringSite`."""

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
        for adapter_id, folder in spec.get("adapters", {}).items():  # loaded and in the bank from the start
            site.keep(adapter_id, load_adapter(folder, sae=sae, layer=site_at.layer, dtype=site.bank.W.dtype))
            site.page([], [adapter_id])
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
    """vLLM loads `fsrl.vllm_plugin.model:FsrlSteered<Arch>` (registered by
    `fsrl.vllm_plugin.register`): the class is made on first use."""
    if name.startswith(PREFIX) and name[len(PREFIX):] in STEERABLE_ARCHITECTURES:
        globals()[name] = cls = steered_model_class(name[len(PREFIX):])
        return cls
    raise AttributeError(name)
