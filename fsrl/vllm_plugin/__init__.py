"""Steering inside vLLM: the steering maths of `fsrl.steering`, run inside
vLLM's compiled model, per token, from fixed-shape buffers written before each step.

How it fits into vLLM (0.32, V1 model runner):

- `register` is a `vllm.general_plugins` entry point (pyproject.toml). vLLM calls it in every
  process it starts (the front end, the engine core, each worker: `load_general_plugins` in
  `vllm/v1/worker/worker_base.py: WorkerWrapperBase.init_worker`). It only names new
  architectures, `FsrlSteered<Arch>` for each of `STEERABLE_ARCHITECTURES`, lazily (nothing is
  imported until a model of one is built), so having fsrl installed beside vLLM changes
  nothing else.
- A request for steering picks the steered form of the model's own architecture with
  `hf_overrides={"architectures": [...], "fsrl_steering": {...}}` (`steered_llm_kwargs`): the
  SAE folder, its layer, the adapters to stack in the bank, the table sizes.
- `fsrl.vllm_plugin.model` builds the model: vLLM's own class for that family, whose decoder
  layer at the SAE's site steers its input (resid_pre) or its output (resid_post) through a
  `SteeringSite` (SAE, adapter bank, per-request table, per-token row index, all registered
  buffers, sized once). Its forward is traced and compiled with the rest of the model; it
  calls `fsrl.steering.steer` on every token.
- Before each forward, `fsrl.vllm_plugin.step` reads the runner's input batch (request ids in
  batch order, `query_start_loc`) and each request's `SamplingParams.extra_args["fsrl"]`, and
  writes the buffers in place.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The vLLM architectures whose decoder layers fsrl steers, each checked against transformers by
# tests/test_vllm_families.py: their layers pass the residual stream along as
# `layer(positions, hidden_states, residual) -> (hidden_states, residual)`, whose sum is the
# stream. Adding a family is adding its name here and to that test.
STEERABLE_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                           "Qwen3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")
# fsrl's per-step hook (fsrl.vllm_plugin.step) wraps the V1 model runner; vLLM's own switch
# pins it (`pin_model_runner`), since Model Runner V2 would run batches past the hook unsteered.
MODEL_RUNNER = "V1 model runner"
PREFIX = "FsrlSteered"  # FsrlSteeredGemma2ForCausalLM: vLLM's Gemma2ForCausalLM, steered
EXTRA_ARGS_KEY = "fsrl"
CONFIG_KEY = "fsrl_steering"
# Per process: steps whose buffers were written, and runs of the steering site's Python outside
# a compiled graph (a compiled graph never runs that branch: a check that the graph, not
# eager Python, did the steering).
COUNTERS = {"steps": 0, "eager_site_forwards": 0}


def register() -> None:
    """The `vllm.general_plugins` entry point: idempotent, cheap, imports no model code."""
    from vllm import ModelRegistry

    known = ModelRegistry.get_supported_archs()
    for arch in STEERABLE_ARCHITECTURES:
        if PREFIX + arch not in known:
            ModelRegistry.register_model(PREFIX + arch, f"fsrl.vllm_plugin.model:{PREFIX}{arch}")


def model_architecture(model_dir: str | Path) -> str:
    """The architecture a transformers folder names, once checked to be one fsrl steers on
    vLLM (one line otherwise: vLLM's own failure is a worker traceback)."""
    from fsrl.errors import FsrlError

    try:
        archs = json.loads((Path(model_dir) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError) as exc:
        raise FsrlError(f"cannot read {model_dir}/config.json ({type(exc).__name__})") from None
    steerable = [a for a in archs if a in STEERABLE_ARCHITECTURES]
    if not steerable:
        raise FsrlError(f"--engine vllm steers {', '.join(STEERABLE_ARCHITECTURES)}; "
                        f"{model_dir} is {', '.join(archs) or 'of no named architecture'} "
                        "(fsrl's default engine serves any transformers causal LM)")
    return steerable[0]


def pin_model_runner() -> None:
    """Make the vLLM processes started from here on use the V1 model runner (the one fsrl's
    per-step hook wraps); a user who asked for V2 gets one line."""
    from fsrl.errors import FsrlError

    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").lower() in ("1", "true"):
        raise FsrlError(f"fsrl steers vLLM's {MODEL_RUNNER} only: unset VLLM_USE_V2_MODEL_RUNNER")
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"


def steered_llm_kwargs(model_dir: str | Path, sae_dir: str, layer: int, adapters: dict[str, str] | None = None,
                       bank_slots: int = 4, table_rows: int | None = None, capture_top: int = 0) -> dict:
    """Keyword arguments for `vllm.LLM` (or engine args) that build the steered model of the
    transformers folder `model_dir`: `adapters` maps adapter id -> folder, stacked in the bank
    at build time (at most `bank_slots`); `table_rows`: requests steered at once (default:
    max_num_seqs); `capture_top`: the most features a request may ask back per token (0: none)."""
    pin_model_runner()  # before vLLM starts its processes: they read it from the environment
    spec = {"sae_dir": str(sae_dir), "layer": int(layer), "adapters": dict(adapters or {}),
            "bank_slots": int(bank_slots), "capture_top": int(capture_top)}
    if table_rows is not None:
        spec["table_rows"] = int(table_rows)
    return {"hf_overrides": {"architectures": [PREFIX + model_architecture(model_dir)], CONFIG_KEY: spec},
            # Prefix caching would let a steered request reuse another's (differently steered)
            # KV blocks, unless each steered prompt carries its steering as `cache_salt` (as
            # `fsrl serve --engine vllm` does, and turns it on).
            "enable_prefix_caching": False,
            "worker_extension_cls": "fsrl.vllm_plugin.worker.SteeringWorkerExtension"}


def steering_extra_args(adapter: str | None = None, scale: float = 1.0, overrides: Sequence[Any] = (),
                        steer_from: int = 0, abort_when: Sequence[Any] = (), generated_from: int = 0,
                        return_features: int = 0, telemetry: bool = False, key: str | None = None) -> dict:
    """`SamplingParams.extra_args` for one request's steering (plain JSON values): `overrides`
    and `abort_when` are `fsrl.overrides` FeatureOverride and Condition objects. With
    `return_features` > 0 its top steered features per token are kept under `key`, with
    `telemetry` what the steering did at each token; with `abort_when`, the feature that stopped
    it too (`fsrl_take_fired`)."""
    def condition(c: Any) -> list:
        return [int(c.index), str(c.comparison), float(c.threshold)]

    spec = {"adapter": adapter, "scale": float(scale),
            "overrides": [[int(o.index), str(o.op), float(o.value), *([condition(o.when)] if o.when else [])]
                          for o in overrides],
            "steer_from": int(steer_from)}
    if abort_when:
        spec.update(abort_when=[condition(c) for c in abort_when], generated_from=int(generated_from))
    if return_features:
        spec.update(return_features=int(return_features))
    if telemetry:
        spec.update(telemetry=True)
    if return_features or telemetry or abort_when:
        spec.update(key=str(key))
    return {EXTRA_ARGS_KEY: spec}


def kv_cache_bytes(model_config: Any, dtype_bytes: int, tokens: int) -> int:
    """Bytes of KV cache `tokens` tokens take in every layer (keys and values), at least 64 MiB;
    `model_config` is a transformers config or a model folder. Sized to what the server admits
    rather than to a share of the device: on vLLM's CPU build that share is of the machine's
    memory, reserved whether used or not."""
    if isinstance(model_config, (str, Path)):
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(model_config)
    heads = model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    per_token = 2 * model_config.num_hidden_layers * kv_heads * head_dim * dtype_bytes
    return max(per_token * tokens, 64 << 20)
