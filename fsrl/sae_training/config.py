"""The settings of one `fsrl sae train` run, the SAE architectures it trains, and the command
line that rebuilds a run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from fsrl.errors import FsrlError


@dataclass
class SaeTrainConfig:
    text: str
    layer: int
    out: str
    model: str | None = None
    d_sae: int = 4608
    architecture: str = "topk"
    k: int = 64
    aux_k_coefficient: float = 1.0
    sparsity_coefficient: float | None = None
    lr: float = 5e-4
    lr_decay_fraction: float = 0.2
    batch_size: int = 1024
    training_tokens: int = 2_000_000
    unique_tokens: int = 0
    context_size: int = 128
    store_batch_size: int = 32
    dead_feature_window: int = 100
    device: str = "auto"
    seed: int = 0
    dtype: str = "float16"
    eval_tokens: int = 32_768
    ce_tokens: int = 4_096
    eval_fraction: float = 0.05
    name: str | None = None
    activation_cache: str | None = None
    max_norm_ratio: float = 10.0
    chat: str | None = None      # JSON Lines of {"prompt", "text"}: chat mixed into the corpus
    chat_share: float = 0.5      # of the training characters, while the chat lasts


# ---------------------------------------------------------------------------------------------
# Architectures: name -> sae-lens training config (resolved once)


def _topk_sae(cfg: SaeTrainConfig, d_in: int, device: str):
    from sae_lens import TopKTrainingSAEConfig

    return TopKTrainingSAEConfig(d_in=d_in, d_sae=cfg.d_sae, k=cfg.k, device=device,
                                 aux_loss_coefficient=cfg.aux_k_coefficient)


def _batchtopk(cfg: SaeTrainConfig, d_in: int, device: str):
    from sae_lens import BatchTopKTrainingSAEConfig

    return BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=cfg.d_sae, k=cfg.k, device=device,
                                      aux_loss_coefficient=cfg.aux_k_coefficient)


def _standard(cfg: SaeTrainConfig, d_in: int, device: str):
    from sae_lens import StandardTrainingSAEConfig

    extra = {} if cfg.sparsity_coefficient is None else {"l1_coefficient": cfg.sparsity_coefficient}
    return StandardTrainingSAEConfig(d_in=d_in, d_sae=cfg.d_sae, device=device, **extra)


def _jumprelu(cfg: SaeTrainConfig, d_in: int, device: str):
    from sae_lens import JumpReLUTrainingSAEConfig

    extra = {} if cfg.sparsity_coefficient is None else {"l0_coefficient": cfg.sparsity_coefficient}
    return JumpReLUTrainingSAEConfig(d_in=d_in, d_sae=cfg.d_sae, device=device, **extra)


@dataclass(frozen=True)
class Architecture:
    """One SAE architecture `fsrl sae train` can train; each saves in an inference architecture
    fsrl.sae reads (batchtopk saves as jumprelu)."""

    name: str
    training_config: Callable[[SaeTrainConfig, int, str], Any]  # (cfg, d_in, device) -> sae-lens's
    uses_k: bool  # --k active features per token


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("topk", _topk_sae, uses_k=True),
    Architecture("batchtopk", _batchtopk, uses_k=True),
    Architecture("standard", _standard, uses_k=False),
    Architecture("jumprelu", _jumprelu, uses_k=False),
)}


def check_config(cfg: SaeTrainConfig) -> Architecture:
    """Fail in one line on settings that cannot train, before anything loads; returns the
    architecture `cfg` names (resolved here, once)."""
    arch = ARCHITECTURES.get(cfg.architecture)
    if arch is None:
        raise FsrlError(f"unknown architecture {cfg.architecture!r}; "
                        f"choose from {', '.join(sorted(ARCHITECTURES))}")
    for name in ("d_sae", "batch_size", "training_tokens", "context_size", "store_batch_size",
                 "eval_tokens", "dead_feature_window"):
        if getattr(cfg, name) <= 0:
            raise FsrlError(f"--{name.replace('_', '-')} must be positive")
    if arch.uses_k and not 0 < cfg.k <= cfg.d_sae:
        raise FsrlError(f"--k must be in 1..{cfg.d_sae}")
    if cfg.context_size < 2:
        raise FsrlError("--context-size must be at least 2 (position 0 is left out)")
    if cfg.max_norm_ratio < 0 or 0 < cfg.max_norm_ratio <= 1:
        raise FsrlError("--max-norm-ratio must be 0 (off) or above 1")
    if not 0 < cfg.chat_share < 1:
        raise FsrlError("--chat-share must be between 0 and 1")
    if not 0 < cfg.eval_fraction < 1:
        raise FsrlError("--eval-fraction must be between 0 and 1")
    if cfg.training_tokens < cfg.batch_size:
        raise FsrlError("--training-tokens must be at least --batch-size")
    return arch


def sae_name(cfg: SaeTrainConfig, arch: Architecture, model_name: str) -> str:
    """The SAE's name in cfg.json: --name, else model, layer, architecture (with k) and size."""
    return cfg.name or (f"{model_name}-L{cfg.layer}-{arch.name}{cfg.k if arch.uses_k else ''}"
                        f"-{cfg.d_sae}")


def rebuild_command(cfg: SaeTrainConfig) -> str:
    """The `fsrl sae train` command line that rebuilds this SAE (options left at their
    defaults are omitted)."""
    defaults = SaeTrainConfig(text="", layer=0, out="")
    parts = ["fsrl", "sae", "train", "--text", cfg.text, "--layer", str(cfg.layer),
             "--out", cfg.out]
    for key, value in asdict(cfg).items():
        if key in ("text", "layer", "out", "activation_cache") or value == getattr(defaults, key):
            continue
        parts += [f"--{key.replace('_', '-')}", str(value)]
    return " ".join(parts)
