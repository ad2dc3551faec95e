"""The settings of one adapter training run (`fsrl train`); its defaults are the command
line's too (fsrl.train.cli)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from fsrl.errors import FsrlError
from fsrl.train.losses import LOSSES, LossSpec


@dataclass
class TrainConfig:
    """Everything one training run reads. Round-trips through JSON (it is saved with the run)."""

    data: str
    out: str
    eval_data: str | None = None
    model: str | None = None            # None: the embedded default model
    sae: str | None = None              # None: the default SAE shipped with fsrl
    layer: int | None = None            # None: the SAE's own hook layer
    adapter_id: str | None = None       # None: the name of the out folder
    loss: str = "simpo"
    beta: float | None = None           # None: the loss's default (SimPO 10, DPO 0.1)
    gamma: float | None = None          # SimPO target margin; None: 0.5 * beta (gamma/beta = 0.5)
    l1: float = 1e-2                    # L1 coefficient on mean_tokens ||v||_1
    nll: float = 0.0                    # weight of the chosen answers' NLL per token (CPO's alpha)
    l1_warmup: float = 0.2              # share of the steps with the L1 term off
    lr: float = 1e-4
    lr_warmup: float = 0.05             # share of the steps with a linear learning-rate ramp
    min_lr_ratio: float = 0.1           # cosine decay ends at lr * min_lr_ratio
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    epochs: float = 1.0
    max_steps: int | None = None        # caps the optimiser steps (the schedule follows it)
    batch_size: int = 4                 # pairs per micro-batch, per process
    grad_accum: int = 2
    eval_batch_size: int | None = None  # None: batch_size
    max_length: int = 256               # tokens per sequence (prompt + response)
    activation: str = "relu"
    clamp_nonnegative: bool = False
    init_std: float = 1e-6              # near zero: step 0 is the base model
    seed: int = 0
    device: str = "auto"
    dtype: str | None = None            # None: bfloat16 on a CUDA device that has it, else float32
    eval_every: int = 0                 # 0: evaluate at the start and the end only
    save_every: int = 0                 # 0: a checkpoint every ~10 % of the run
    keep_checkpoints: int = 2
    resume: str | None = None           # a checkpoint folder, or "latest" (under out/checkpoints)
    eval_limit: int = 128               # with no eval data: evaluate on this many training pairs
    progress: bool = True

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def loss_spec(self) -> LossSpec:
        if self.loss not in LOSSES:
            raise FsrlError(f"unknown loss {self.loss!r}; expected one of {', '.join(LOSSES)}")
        return LOSSES[self.loss]

    @property
    def resolved_beta(self) -> float:
        return self.beta if self.beta is not None else self.loss_spec.default_beta

    @property
    def resolved_gamma(self) -> float:
        return self.gamma if self.gamma is not None else 0.5 * self.resolved_beta
