"""The saved SAE folder: sae-lens's inference folder in the chosen dtype, with our metadata."""

from __future__ import annotations

import json
from pathlib import Path

from fsrl.sae_training.config import SaeTrainConfig
from fsrl.sae_training.exclusions import Exclusions


def write_output(trained_dir: Path, out: Path, cfg: SaeTrainConfig, sae_name: str, base,
                 excl: Exclusions) -> None:
    """Copy sae-lens's inference folder into OUT in the chosen dtype, with our metadata."""
    import torch
    from safetensors.torch import load_file, save_file

    from fsrl.sae import SAE_CFG_FILE, SAE_WEIGHTS_FILE

    dtype = getattr(torch, cfg.dtype)
    out.mkdir(parents=True, exist_ok=True)
    weights = load_file(trained_dir / SAE_WEIGHTS_FILE)
    save_file({k: v.to(dtype).contiguous() for k, v in weights.items()}, out / SAE_WEIGHTS_FILE)
    (out / SAE_WEIGHTS_FILE).chmod(0o644)  # safetensors writes 0600; this folder may be shipped
    sae_cfg = json.loads((trained_dir / SAE_CFG_FILE).read_text())
    sae_cfg["dtype"] = cfg.dtype
    sae_cfg["device"] = "cpu"
    meta = sae_cfg.setdefault("metadata", {})
    meta.update({"sae_name": sae_name, "model_name": base.name,
                 "fsrl_model_fingerprint": base.fingerprint,
                 "hook_name": f"model.layers.{cfg.layer}", "dataset_path": cfg.text,
                 "excluded_token_ids": excl.token_ids,
                 "excluded_activation_norm_above": excl.norm_threshold})
    (out / SAE_CFG_FILE).write_text(json.dumps(sae_cfg, indent=2) + "\n")
