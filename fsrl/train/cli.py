"""`fsrl train`: train one FSRL adapter on preference data (SimPO or DPO, plus L1 on v)."""

from __future__ import annotations

import argparse
import math

from fsrl.adapter import ACTIVATIONS
from fsrl.cli_options import ConfigOptions
from fsrl.errors import FsrlError
from fsrl.train.config import TrainConfig
from fsrl.train.losses import LOSSES


# Defaults live in TrainConfig; every option that fills one of its fields takes that default.
OPTIONS = ConfigOptions(TrainConfig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = OPTIONS.add
    d = parser.add_argument_group("data")
    add(d, "--data",
        help="preference pairs: JSON Lines, parquet, or a `datasets` folder "
             '({"prompt", "chosen", "rejected"}, strings or chat messages)')
    add(d, "--eval-data", help="held-out pairs, same layout (default: the first "
                               "--eval-limit training pairs)")
    add(d, "--eval-limit", type=int, help=argparse.SUPPRESS)
    add(d, "--max-length", type=int,
        help="tokens per sequence; longer rows lose prompt tokens first (default %(default)s)")
    add(d, "--out", help="adapter folder to write (adapters/<id>)")
    add(d, "--id", dest="adapter_id", help="adapter id (default: the --out folder's name)")

    m = parser.add_argument_group("model")
    add(m, "--model", help="base model: folder, .gguf or hub name (default: embedded default)")
    add(m, "--sae", help="SAE folder in sae-lens format (default: the SAE shipped with fsrl)")
    add(m, "--layer", type=int, help="hook layer (default: the SAE's own layer)")
    add(m, "--device", help="auto | cpu | cuda | cuda:N (default %(default)s)")
    add(m, "--dtype", choices=["float32", "bfloat16", "float16"],
        help="model dtype (default: bfloat16 on a CUDA device that has it, else float32)")

    a = parser.add_argument_group("adapter")
    add(a, "--activation", choices=list(ACTIVATIONS),
        help="relu: steering only adds; soft_threshold: can push features down; constant: v = b at every "
             "position, b learned (no map) (default %(default)s)")
    add(a, "--clamp-nonnegative", action="store_true",
        help="clamp the steered features at zero: g = relu(f + v)")
    add(a, "--init-std", type=float, help="adapter init scale (default %(default)g)")

    o = parser.add_argument_group("objective")
    add(o, "--loss", choices=list(LOSSES),
        help="simpo: no reference; dpo: reference = the model with steering off (default %(default)s)")
    add(o, "--beta", type=float, help="SimPO/DPO beta (default: " + ", ".join(
        f"{name} {spec.default_beta:g}" for name, spec in LOSSES.items()) + ")")
    add(o, "--gamma", type=float,
        help="SimPO target margin gamma, as TRL's simpo_gamma (default 0.5 * beta, "
             "i.e. gamma/beta = 0.5)")
    add(o, "--l1", type=float, help="L1 coefficient on mean_tokens ||v||_1 (default %(default)g)")
    add(o, "--nll", type=float,
        help="adds this times the chosen answers' mean negative log-likelihood per token, so the "
             "steered model learns to write them, not only to prefer them (CPO's alpha; default %(default)g)")
    add(o, "--l1-warmup", type=float, help="share of the steps with the L1 term off (default %(default)g)")

    t = parser.add_argument_group("optimisation")
    add(t, "--lr", type=float, help="AdamW learning rate (default %(default)g)")
    add(t, "--weight-decay", type=float)
    add(t, "--epochs", type=float, help="passes over the data (default %(default)g)")
    add(t, "--max-steps", type=int, help="stop after this many optimiser steps")
    add(t, "--batch-size", type=int, help="pairs per micro-batch (default %(default)s)")
    add(t, "--grad-accum", type=int, help="micro-batches per step (default %(default)s)")
    add(t, "--eval-batch-size", type=int)
    add(t, "--seed", type=int)

    r = parser.add_argument_group("run")
    add(r, "--eval-every", type=int, help="steps between evaluations (default: start and end)")
    add(r, "--save-every", type=int, help="steps between checkpoints (default: ~10 %% of the run)")
    add(r, "--resume", nargs="?", const="latest",
        help="continue from a checkpoint folder (no value: the latest under OUT/checkpoints)")
    add(r, "--no-progress", dest="progress", action="store_false", help="no progress bar")
    add(r, "--threads", type=int, help="torch CPU threads (on a shared machine 1 can be fastest)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    checks = [("--batch-size", args.batch_size, 1), ("--grad-accum", args.grad_accum, 1),
              ("--max-length", args.max_length, 8)]
    for name, value, least in checks:
        if value < least:
            raise FsrlError(f"{name} must be at least {least}, got {value}")
    for name, value in (("--lr", args.lr), ("--l1", args.l1), ("--epochs", args.epochs)):
        if not math.isfinite(value) or value < 0:
            raise FsrlError(f"{name} must be a finite number >= 0, got {value}")
    if not 0 <= args.l1_warmup <= 1:
        raise FsrlError(f"--l1-warmup is a share of the steps in [0, 1], got {args.l1_warmup}")
    return OPTIONS.config(args)


def format_summary(s: dict) -> str:
    first = s.get("initial_eval") or {}
    lines = [
        f"adapter written: {s['out']}",
        f"  {s['loss']} beta={s['beta']:g}" + (f" gamma={s['gamma']:g}" if s.get("gamma") is not None else "")
        + f" l1={s['l1_coefficient']:g} (off for the first {s['l1_warmup']:.0%} of steps)"
        + (f" nll={s['nll']:g}" if s.get("nll") else "") + f" lr={s['lr']:g}",
        f"  {s['steps']} steps ({s['epochs']:g} epochs) on {s['data']['pairs']} pairs, effective batch "
        f"{s['effective_batch']}, {s['train_seconds']:.0f} s on {s['device']} ({s['dtype']})",
        f"  eval on {s['eval_data']['pairs']} pairs: loss "
        + (f"{first['loss']:.4f} -> " if first else "") + f"{s['final_eval_loss']:.4f}, accuracy "
        + (f"{first['accuracy']:.3f} -> " if first else "") + f"{s['final_eval_accuracy']:.3f}, "
        f"mean L0 of v {s['mean_l0']:.1f} of {s['d_sae']}",
    ]
    top = s.get("top_features") or []
    if top:
        lines.append("  features pushed most (index: mean v): " + ", ".join(
            f"{f['index']}: {f['mean_v']:+.3g}" + (f" [{f['label']}]" if f.get("label") else "")
            for f in top[:8]))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from fsrl.train.trainer import train

    cfg = config_from_args(args)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    result = train(cfg)
    summary = dict(result.summary, out=str(result.out), d_sae=result.adapter.config.d_sae)
    print(format_summary(summary))
    return 0


if __name__ == "__main__":  # python -m fsrl.train.cli ... (same as `fsrl train ...`)
    import sys

    from fsrl.cli import main
    sys.exit(main(["train", *sys.argv[1:]]))
