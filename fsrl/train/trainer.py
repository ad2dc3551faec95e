"""Offline FSRL training: one adapter, a frozen base model and SAE, a preference loss.

The adapter is attached through `fsrl.steering.SteeringHook` at the SAE's layer, exactly as at
inference; gradients flow from the loss through the decoder layers above the hook into the
adapter, and into nothing else (every base and SAE tensor is frozen). One optimiser step:

    for each of grad_accum micro-batches of batch_size pairs (2 * batch_size sequences):
        logps   = response log-probs with steering on                  (SimPO: mean, DPO: sum)
        ref     = the same with steering off, no grad                  (DPO only)
        loss    = preference loss + l1(step) * mean_tokens ||v||_1     l1 = 0 during warm-up
    clip, AdamW step on the adapter, lr with linear warm-up then cosine decay

Multi-process (`accelerate launch` or `torchrun`, which set RANK / WORLD_SIZE): each process
takes its share of every step's pairs and the adapter's gradients are summed across processes
by hand (the adapter is tiny and is called from inside a hook, where DDP's wrapper cannot see
it). Process 0 logs, evaluates into the summary and writes files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from fsrl.adapter import FsrlAdapter, new_adapter, save_adapter
from fsrl.analysis import FeaturePush, top_features
from fsrl.errors import FsrlError
from fsrl.files import sha256_of
from fsrl.models import BaseModel, default_dtype, load_base_model, resolve_device
from fsrl.sae import Sae, default_sae_dir, load_sae
from fsrl.steering import RowSteering, SteeringBatch, SteeringHook
from fsrl.train.config import TrainConfig
from fsrl.train.data import PairBatch, PreferenceDataset, load_pairs
from fsrl.train.losses import LossSpec, SequenceLogps, l1_coefficient, l1_penalty, mean_l0, sequence_logps

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.pt"
TOP_FEATURES = 20
RECENT_STEPS = 20  # the summary's final training figures average the last this many steps


# --------------------------------------------------------------------------------- forward

@dataclass
class PairForward:
    """What one forward over a PairBatch gives the loss."""

    logps: SequenceLogps                # (2B,) chosen rows first
    l1: torch.Tensor | None = None      # () mean over real tokens of ||v||_1
    l0: torch.Tensor | None = None      # () mean over real tokens of #(v != 0)
    v_sum: torch.Tensor | None = None   # (d_sae,) sum of v over real tokens (feature ranking)
    v_abs_sum: torch.Tensor | None = None  # (d_sae,) sum of |v|
    v_active: torch.Tensor | None = None  # (d_sae,) tokens where v_i != 0
    tokens: int = 0


def forward_pairs(base: BaseModel, hook: SteeringHook, adapter: FsrlAdapter | None,
                  batch: PairBatch, feature_stats: bool = False) -> PairForward:
    """Response log-probabilities of every row, steered by `adapter` (None: the base model).

    With an adapter the result is differentiable with respect to it and carries the L1 and L0
    of v over the real (non-padding) tokens.
    """
    N, T = batch.input_ids.shape
    first = batch.first_response_position                   # logits from first - 1 on are needed
    offset = max(first - 1, 0)
    steering = None
    if adapter is not None:
        steering = SteeringBatch.build([RowSteering(adapter)] * N, adapter.config.d_sae,
                                       device=base.device, dtype=hook.sae.W_dec.dtype)
    with hook.steering(steering, batch.positions, keep_v=adapter is not None) as capture:
        out = base.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         position_ids=batch.positions.clamp(min=0), use_cache=False, logits_to_keep=T - offset)
    logps = sequence_logps(out.logits, batch.input_ids, batch.response_mask, offset=offset)
    result = PairForward(logps=logps, tokens=int(batch.attention_mask.sum()))
    if adapter is not None:
        v, real = capture.v, batch.attention_mask.bool()                   # (N, T, d_sae), (N, T)
        result.l1, result.l0 = l1_penalty(v, real), mean_l0(v.detach(), real)
        if feature_stats:
            vd = v.detach() * real[..., None]
            result.v_sum = vd.sum((0, 1))
            result.v_abs_sum = vd.abs().sum((0, 1))
            result.v_active = (vd != 0).sum((0, 1)).float()
    return result


def pair_logps(fwd: PairForward, spec: LossSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-probabilities as the loss reads them: (B,), (B,)."""
    values = fwd.logps.mean if spec.length_normalised else fwd.logps.sum
    half = values.shape[0] // 2
    return values[:half], values[half:]


@dataclass
class StepStats:
    loss: float            # the preference loss alone (what evaluation reports)
    total: float           # plus the L1 term
    accuracy: float
    l0: float
    pairs: int


def preference_loss(base: BaseModel, hook: SteeringHook, adapter: FsrlAdapter | None,
                    batch: PairBatch, cfg: TrainConfig, l1_coef: float,
                    feature_stats: bool = False) -> tuple[torch.Tensor, StepStats, PairForward]:
    """Mean preference loss over the batch's pairs, plus l1_coef times the L1 of v, plus cfg.nll
    times the chosen answers' mean negative log-likelihood per token."""
    spec = cfg.loss_spec
    fwd = forward_pairs(base, hook, adapter, batch, feature_stats=feature_stats)
    reference = None
    if spec.needs_reference:
        with torch.no_grad():
            reference = pair_logps(forward_pairs(base, hook, None, batch), spec)
    pref = spec(pair_logps(fwd, spec), reference, beta=cfg.resolved_beta, gamma=cfg.resolved_gamma)
    loss = pref.losses.mean()
    total = loss + l1_coef * fwd.l1 if (fwd.l1 is not None and l1_coef > 0) else loss
    if cfg.nll > 0:
        total = total - cfg.nll * fwd.logps.mean[:batch.n_pairs].mean()
    stats = StepStats(loss=float(loss.detach()), total=float(total.detach()), accuracy=float(pref.accuracy),
                      l0=float(fwd.l0) if fwd.l0 is not None else 0.0, pairs=batch.n_pairs)
    return total, stats, fwd


# ------------------------------------------------------------------------------ evaluation

@dataclass
class EvalResult:
    loss: float
    accuracy: float
    mean_l0: float
    pairs: int
    top_features: list[dict[str, Any]] = field(default_factory=list)
    mean_l1: float = 0.0            # mean over real tokens of ||v||_1 (the L1 term before lambda)
    # With feature_stats: every feature's mean v, mean |v| and share pushed (not a field: the
    # result's fields go into JSON summaries, this stays in memory).
    push: ClassVar[FeaturePush | None] = None


@torch.no_grad()
def evaluate(base: BaseModel, hook: SteeringHook, adapter: FsrlAdapter | None,
             dataset: PreferenceDataset, cfg: TrainConfig, dist: "Dist | None" = None,
             feature_stats: bool = False) -> EvalResult:
    """Held-out preference loss (without the L1 term), preference accuracy, and mean L0 and L1
    of v (adapter None: the base model)."""
    dist = dist or Dist()
    bs = cfg.eval_batch_size or cfg.batch_size
    sums = torch.zeros(6, dtype=torch.float64)          # loss*pairs, correct, l0*tokens, tokens, pairs, l1*tokens
    d_sae = hook.sae.d_sae
    v_sum = torch.zeros(d_sae, dtype=torch.float64)
    v_abs_sum = torch.zeros(d_sae, dtype=torch.float64)
    v_active = torch.zeros(d_sae, dtype=torch.float64)
    mine = list(range(dist.rank, len(dataset), dist.world))
    for start in range(0, len(mine), bs):
        batch = dataset.batch(mine[start:start + bs]).to(base.device)
        _, stats, fwd = preference_loss(base, hook, adapter, batch, cfg, 0.0, feature_stats)
        sums += torch.tensor([stats.loss * stats.pairs, stats.accuracy * stats.pairs,
                              stats.l0 * fwd.tokens, fwd.tokens, stats.pairs,
                              float(fwd.l1 if fwd.l1 is not None else 0.0) * fwd.tokens], dtype=torch.float64)
        if fwd.v_sum is not None:
            v_sum += fwd.v_sum.double().cpu()
            v_abs_sum += fwd.v_abs_sum.double().cpu()
            v_active += fwd.v_active.double().cpu()
    sums, v_sum, v_abs_sum, v_active = (dist.sum(t) for t in (sums, v_sum, v_abs_sum, v_active))
    pairs, tokens = max(sums[4].item(), 1), max(sums[3].item(), 1)
    result = EvalResult(loss=sums[0].item() / pairs, accuracy=sums[1].item() / pairs,
                        mean_l0=sums[2].item() / tokens, pairs=int(sums[4].item()),
                        mean_l1=sums[5].item() / tokens)
    if feature_stats and adapter is not None:
        result.push = FeaturePush.from_sums(v_sum, v_abs_sum, v_active, tokens)
        result.top_features = top_features(result.push, hook.sae, TOP_FEATURES)
    return result


# ------------------------------------------------------------------------- multi-process

class Dist:
    """The process group, when launched with several processes; a no-op otherwise."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    def init(self, device: torch.device) -> None:
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        if torch.distributed.get_backend() == "nccl":
            dev = torch.device("cuda", torch.cuda.current_device())
            buf = t.to(dev)
            torch.distributed.all_reduce(buf)
            return buf.to(t.device)
        torch.distributed.all_reduce(t)
        return t


# ------------------------------------------------------------------------------- training

@dataclass
class TrainingSetup:
    base: BaseModel
    sae: Sae
    layer: int
    hook: SteeringHook


def load_setup(cfg: TrainConfig, dist: Dist) -> TrainingSetup:
    device = resolve_device(cfg.device)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else default_dtype(device)
    base = load_base_model(cfg.model, device, dtype)
    sae_path = Path(cfg.sae) if cfg.sae else default_sae_dir()
    sae = load_sae(sae_path, device=device)                 # float32: the steering maths in full
    return bind_setup(base, sae, cfg.layer)


def bind_setup(base: BaseModel, sae: Sae, layer: int | None) -> TrainingSetup:
    """Check that the SAE fits the model and attach the steering hook at the SAE's site."""
    if layer is not None and sae.info.layer is not None and sae.info.layer != layer:
        raise FsrlError(f"SAE {sae.info.name} was trained at layer {sae.info.layer}, not {layer}")
    site = sae.site_at(layer)
    if sae.d_in != base.d_model:
        raise FsrlError(f"SAE {sae.info.name} reads d_in={sae.d_in}, but model {base.name} "
                        f"has d_model={base.d_model}")
    return TrainingSetup(base=base, sae=sae, layer=site.layer, hook=SteeringHook(base.layers, site, sae))


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio (nanoGPT's schedule)."""
    warmup = max(1, int(cfg.lr_warmup * total))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _latest_checkpoint(out: Path) -> Path:
    found = sorted((out / CHECKPOINT_DIR).glob("step-*"))
    found = [p for p in found if (p / STATE_FILE).exists()]
    if not found:
        raise FsrlError(f"--resume: no checkpoint under {out / CHECKPOINT_DIR}")
    return found[-1]


@dataclass
class TrainResult:
    adapter: FsrlAdapter
    summary: dict[str, Any]
    out: Path


@dataclass(frozen=True)
class Schedule:
    """How long a run is: pairs per optimiser step (all processes), steps per epoch and in all,
    and how often it checkpoints."""

    pairs_per_step: int
    steps_per_epoch: int
    total_steps: int
    save_every: int

    @classmethod
    def plan(cls, cfg: TrainConfig, n_pairs: int, world: int) -> "Schedule":
        pairs_per_step = cfg.batch_size * cfg.grad_accum * world
        steps_per_epoch = math.ceil(n_pairs / pairs_per_step)
        total_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
        if cfg.max_steps is not None:
            total_steps = min(total_steps, cfg.max_steps) if cfg.max_steps > 0 else total_steps
        save_every = cfg.save_every or max(1, total_steps // 10)
        return cls(pairs_per_step, steps_per_epoch, total_steps, save_every)


@dataclass
class TrainingRun:
    """One run's moving parts, from setup to summary; `step` is the optimiser steps taken."""

    cfg: TrainConfig
    dist: Dist
    setup: TrainingSetup
    out: Path
    train_set: PreferenceDataset
    eval_set: PreferenceDataset
    eval_on: str                        # what the summary says the evaluation pairs are
    schedule: Schedule
    adapter: FsrlAdapter
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    initial: EvalResult | None = None   # the step-0 evaluation (None when resumed)
    recent: list[StepStats] = field(default_factory=list)


def train(cfg: TrainConfig, setup: TrainingSetup | None = None) -> TrainResult:
    """Train one adapter as `cfg` says; write it (with its summary) to cfg.out."""
    run = start_run(cfg, setup)
    train_seconds = _train_steps(run)
    final = _evaluate_at_end(run)
    summary = build_summary(run, final, train_seconds)
    run.adapter.config.training = summary
    if run.dist.main:
        save_adapter(run.adapter, run.out)
        (run.out / "train_history.json").write_text(json.dumps(run.history, indent=1) + "\n")
    return TrainResult(adapter=run.adapter, summary=summary, out=run.out)


def start_run(cfg: TrainConfig, setup: TrainingSetup | None = None) -> TrainingRun:
    """Data, model, schedule, a fresh adapter and its optimiser; then the checkpoint to resume
    from, or else the evaluation at step 0 (the base model)."""
    dist = Dist()
    cfg.loss_spec  # an unknown loss fails here, before anything loads
    out = Path(cfg.out)
    # The data is checked before the model loads: a bad row fails in a second, naming its line.
    train_pairs = load_pairs(cfg.data)
    eval_pairs = load_pairs(cfg.eval_data) if cfg.eval_data else train_pairs[: cfg.eval_limit]
    setup = setup or load_setup(cfg, dist)
    base, sae = setup.base, setup.sae
    dist.init(base.device)
    torch.manual_seed(cfg.seed)

    train_set = PreferenceDataset(train_pairs, base.tokenizer, cfg.max_length)
    eval_set = PreferenceDataset(eval_pairs, base.tokenizer, cfg.max_length)
    if cfg.eval_data:
        eval_on = cfg.eval_data
    else:
        eval_on = f"{cfg.data} (first {len(eval_set)} training pairs: no --eval-data)"
    if train_set.truncated:
        log.info("%d of %d training pairs were truncated to --max-length %d",
                 train_set.truncated, len(train_set), cfg.max_length)
    schedule = Schedule.plan(cfg, len(train_set), dist.world)

    adapter = new_adapter(cfg.adapter_id or out.name, sae, base.name, base.fingerprint, setup.layer,
                          activation=cfg.activation, clamp_nonnegative=cfg.clamp_nonnegative,
                          init_std=cfg.init_std, seed=cfg.seed).to(base.device)
    params = [p for p in adapter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    run = TrainingRun(cfg=cfg, dist=dist, setup=setup, out=out, train_set=train_set,
                      eval_set=eval_set, eval_on=eval_on, schedule=schedule, adapter=adapter,
                      params=params, optimizer=optimizer)

    if cfg.resume:
        ckpt = _latest_checkpoint(out) if cfg.resume == "latest" else Path(cfg.resume)
        run.step, run.history = _restore(ckpt, adapter, optimizer, cfg, schedule.total_steps,
                                         schedule.pairs_per_step)
        log.info("resumed from %s at step %d of %d", ckpt, run.step, schedule.total_steps)
    if run.step == 0:
        run.initial = evaluate(base, setup.hook, adapter, eval_set, cfg, dist)
        log.info("eval at step 0 (the base model): loss %.4f, accuracy %.3f, L0 %.1f on %d pairs",
                 run.initial.loss, run.initial.accuracy, run.initial.mean_l0, run.initial.pairs)
        run.history.append(_eval_row(0, run.initial))
    return run


def _train_steps(run: TrainingRun) -> float:
    """Optimiser steps until the schedule's end, with the evaluations and checkpoints due on
    the way; returns the training time in seconds, evaluations excluded."""
    t0 = time.perf_counter()
    bar = _progress(run.cfg, run.dist, run.schedule.total_steps, run.step)
    run.adapter.train()
    while run.step < run.schedule.total_steps:
        stats, l1_now = optimisation_step(run)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{stats.loss:.3f}", acc=f"{stats.accuracy:.2f}", L0=f"{stats.l0:.0f}",
                            l1=f"{l1_now:g}")
        t0 += _evaluate_and_checkpoint(run)
    if bar is not None:
        bar.close()
    return time.perf_counter() - t0


def optimisation_step(run: TrainingRun) -> tuple[StepStats, float]:
    """One AdamW step over the next step's pairs (this process takes its share; gradients and
    figures are summed across processes); returns the step's figures and its L1 coefficient."""
    cfg, dist, schedule = run.cfg, run.dist, run.schedule
    epoch, within = divmod(run.step, schedule.steps_per_epoch)
    order = run.train_set.order(epoch, cfg.seed)
    step_pairs = order[within * schedule.pairs_per_step:(within + 1) * schedule.pairs_per_step]
    mine = step_pairs[dist.rank::dist.world]
    l1_now = l1_coefficient(run.step, schedule.total_steps, cfg.l1, cfg.l1_warmup)
    lr_now = lr_at(run.step, schedule.total_steps, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr_now

    run.optimizer.zero_grad(set_to_none=False)
    base, hook = run.setup.base, run.setup.hook
    merged = StepStats(0.0, 0.0, 0.0, 0.0, 0)
    for k in range(cfg.grad_accum):
        micro = mine[k * cfg.batch_size:(k + 1) * cfg.batch_size]
        if not micro:
            continue
        batch = run.train_set.batch(micro).to(base.device)
        total, stats, _ = preference_loss(base, hook, run.adapter, batch, cfg, l1_now)
        # Weighted by pairs, so the step's gradient is the mean over all its pairs.
        (total * (stats.pairs / len(step_pairs))).backward()
        w = stats.pairs
        merged = StepStats(merged.loss + stats.loss * w, merged.total + stats.total * w,
                           merged.accuracy + stats.accuracy * w, merged.l0 + stats.l0 * w,
                           merged.pairs + w)
    for p in run.params:
        p.grad = dist.sum(p.grad if p.grad is not None else torch.zeros_like(p))
    packed = dist.sum(torch.tensor([merged.loss, merged.total, merged.accuracy, merged.l0,
                                    merged.pairs], dtype=torch.float64))
    n = max(packed[4].item(), 1)
    stats = StepStats(*(packed[i].item() / n for i in range(4)), pairs=int(n))
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm)
    run.optimizer.step()
    run.step += 1

    run.recent = (run.recent + [stats])[-RECENT_STEPS:]
    run.history.append({"step": run.step, "loss": round(stats.loss, 5), "total": round(stats.total, 5),
                        "accuracy": round(stats.accuracy, 4), "l0": round(stats.l0, 2),
                        "l1_coef": l1_now, "lr": lr_now, "grad_norm": round(float(grad_norm), 5)})
    return stats, l1_now


def _evaluate_and_checkpoint(run: TrainingRun) -> float:
    """The evaluation (every --eval-every steps) and checkpoint (every --save-every, process 0)
    due after the step just taken, none after the last; returns the seconds spent evaluating."""
    cfg, step, total_steps = run.cfg, run.step, run.schedule.total_steps
    eval_seconds = 0.0
    if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
        t_eval = time.perf_counter()
        mid = evaluate(run.setup.base, run.setup.hook, run.adapter, run.eval_set, cfg, run.dist)
        eval_seconds = time.perf_counter() - t_eval
        run.history.append(_eval_row(step, mid))
        log.info("eval at step %d: loss %.4f, accuracy %.3f, L0 %.1f", step, mid.loss, mid.accuracy, mid.mean_l0)
    if step % run.schedule.save_every == 0 and step < total_steps and run.dist.main:
        _checkpoint(run.out, step, run.adapter, run.optimizer, cfg, total_steps,
                    run.schedule.pairs_per_step, run.history)
    return eval_seconds


def _evaluate_at_end(run: TrainingRun) -> EvalResult:
    """The final evaluation, with the features the adapter pushes most."""
    run.adapter.eval()
    final = evaluate(run.setup.base, run.setup.hook, run.adapter, run.eval_set, run.cfg, run.dist,
                     feature_stats=True)
    log.info("eval at step %d: loss %.4f, accuracy %.3f, L0 %.1f on %d pairs",
             run.step, final.loss, final.accuracy, final.mean_l0, final.pairs)
    run.history.append(_eval_row(run.step, final))
    return final


def _eval_row(step: int, result: EvalResult) -> dict[str, Any]:
    """An evaluation's line in train_history.json."""
    return {"step": step, "eval_loss": result.loss, "eval_accuracy": result.accuracy,
            "eval_l0": result.mean_l0}


def build_summary(run: TrainingRun, final: EvalResult, train_seconds: float) -> dict[str, Any]:
    """The run's summary: the recipe, the data, the first and final evaluations, the top
    features; saved in the adapter's config as `training`."""
    cfg, base, initial, recent = run.cfg, run.setup.base, run.initial, run.recent
    return {
        "method": "fsrl", "loss": cfg.loss, "beta": cfg.resolved_beta,
        "gamma": cfg.resolved_gamma if cfg.loss == "simpo" else None,
        "gamma_beta_ratio": cfg.resolved_gamma / cfg.resolved_beta if cfg.loss == "simpo" else None,
        "l1_coefficient": cfg.l1, "l1_warmup": cfg.l1_warmup, "nll": cfg.nll, "lr": cfg.lr, "steps": run.step,
        "epochs": round(run.step / run.schedule.steps_per_epoch, 3), "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum, "processes": run.dist.world,
        "effective_batch": run.schedule.pairs_per_step,
        "max_length": cfg.max_length, "seed": cfg.seed, "init_std": cfg.init_std,
        "data": {"path": cfg.data, "pairs": len(run.train_set), "sha256_16": sha256_of(cfg.data, 16),
                 "truncated": run.train_set.truncated},
        "eval_data": {"path": run.eval_on, "pairs": final.pairs},
        "initial_eval": asdict(initial) if initial else None,
        "final_eval": {k: v for k, v in asdict(final).items() if k != "top_features"},
        "final_eval_loss": final.loss, "final_eval_accuracy": final.accuracy,
        "mean_l0": final.mean_l0,
        "final_train": {"loss": _mean(recent, "loss"), "accuracy": _mean(recent, "accuracy"),
                        "l0": _mean(recent, "l0"), "over_last_steps": len(recent)},
        "top_features": final.top_features,
        "device": str(base.device), "dtype": str(base.dtype).removeprefix("torch."),
        "train_seconds": round(train_seconds, 1),
        "trainable_parameters": run.adapter.parameter_count(),
        "fsrl_version": _version(),
    }


def _mean(items: list[StepStats], key: str) -> float | None:
    return round(sum(getattr(s, key) for s in items) / len(items), 5) if items else None


def _version() -> str:
    from fsrl import __version__
    return __version__


def _progress(cfg: TrainConfig, dist: Dist, total: int, initial: int):
    if not (cfg.progress and dist.main):
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc="fsrl train", unit="step", dynamic_ncols=True)


# ----------------------------------------------------------------------------- checkpoints

RESUME_MUST_MATCH = ("data", "loss", "beta", "gamma", "l1", "l1_warmup", "lr", "batch_size",
                     "grad_accum", "max_length", "activation", "clamp_nonnegative", "seed", "epochs",
                     "max_steps")


def _checkpoint(out: Path, step: int, adapter: FsrlAdapter, optimizer: torch.optim.Optimizer,
                cfg: TrainConfig, total_steps: int, pairs_per_step: int, history: list) -> Path:
    folder = out / CHECKPOINT_DIR / f"step-{step:07d}"
    partial = folder.with_name(folder.name + ".partial")
    save_adapter(adapter, partial)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "config": cfg.to_json(),
                "total_steps": total_steps, "pairs_per_step": pairs_per_step, "history": history},
               partial / STATE_FILE)
    if folder.exists():
        shutil.rmtree(folder)
    partial.rename(folder)
    for old in sorted((out / CHECKPOINT_DIR).glob("step-*"))[:-cfg.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    log.debug("checkpoint %s", folder)
    return folder


def _restore(folder: Path, adapter: FsrlAdapter, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
             total_steps: int, pairs_per_step: int) -> tuple[int, list]:
    from fsrl.adapter import load_adapter

    if not (folder / STATE_FILE).exists():
        raise FsrlError(f"--resume: {folder} is not a checkpoint (no {STATE_FILE})")
    try:  # weights_only: tensors and plain data, never arbitrary objects (a checkpoint may be foreign)
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle refuses what weights_only does not allow; or a broken file
        raise FsrlError(f"--resume: cannot read {folder / STATE_FILE} ({type(exc).__name__})") from None
    saved = state["config"]
    differ = [k for k in RESUME_MUST_MATCH if saved.get(k) != getattr(cfg, k)]
    if differ:
        raise FsrlError(f"--resume: {folder} was made with other settings: " + ", ".join(
            f"{k} {saved.get(k)!r} (now {getattr(cfg, k)!r})" for k in differ))
    if state["total_steps"] != total_steps or state["pairs_per_step"] != pairs_per_step:
        raise FsrlError(f"--resume: {folder} planned {state['total_steps']} steps of "
                        f"{state['pairs_per_step']} pairs; this run plans {total_steps} of {pairs_per_step}")
    saved_adapter = load_adapter(folder, sae=None)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            p.copy_(getattr(saved_adapter, name))
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"]), list(state["history"])
