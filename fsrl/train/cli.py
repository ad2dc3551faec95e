"""`fsrl train`: train one FSRL adapter on preference data (SimPO or DPO, plus L1 on v)."""

from __future__ import annotations

import argparse
import math

from fsrl.errors import FsrlError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = parser.add_argument_group("data")
    d.add_argument("--data", required=True,
                   help="preference pairs: JSON Lines, parquet, or a `datasets` folder "
                        '({"prompt", "chosen", "rejected"}, strings or chat messages)')
    d.add_argument("--eval-data", help="held-out pairs, same layout (default: the first "
                                       "--eval-limit training pairs)")
    d.add_argument("--eval-limit", type=int, default=128, help=argparse.SUPPRESS)
    d.add_argument("--max-length", type=int, default=256,
                   help="tokens per sequence; longer rows lose prompt tokens first (default 256)")
    d.add_argument("--out", required=True, help="adapter folder to write (adapters/<id>)")
    d.add_argument("--id", dest="adapter_id", help="adapter id (default: the --out folder's name)")

    m = parser.add_argument_group("model")
    m.add_argument("--model", help="base model: folder, .gguf or hub name (default: embedded default)")
    m.add_argument("--sae", help="SAE folder in sae-lens format (default: the SAE shipped with fsrl)")
    m.add_argument("--layer", type=int, help="hook layer (default: the SAE's own layer)")
    m.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    m.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default: bfloat16 on a CUDA device that has it, else float32)")

    a = parser.add_argument_group("adapter")
    a.add_argument("--activation", default="relu", choices=["relu", "soft_threshold"],
                   help="relu: steering only adds; soft_threshold: can push features down (default relu)")
    a.add_argument("--clamp-nonnegative", action="store_true",
                   help="clamp the steered features at zero: g = relu(f + v)")
    a.add_argument("--init-std", type=float, default=1e-6, help="adapter init scale (default 1e-6)")

    o = parser.add_argument_group("objective")
    o.add_argument("--loss", default="simpo", choices=["simpo", "dpo"],
                   help="simpo (default): no reference; dpo: reference = the model with steering off")
    o.add_argument("--beta", type=float, help="SimPO/DPO beta (default: simpo 10, dpo 0.1)")
    o.add_argument("--gamma", type=float,
                   help="SimPO target margin gamma, as TRL's simpo_gamma (default 0.5 * beta, "
                        "i.e. gamma/beta = 0.5)")
    o.add_argument("--l1", type=float, default=1e-2, help="L1 coefficient on mean_tokens ||v||_1 (default 1e-2)")
    o.add_argument("--l1-warmup", type=float, default=0.2,
                   help="share of the steps with the L1 term off (default 0.2)")

    t = parser.add_argument_group("optimisation")
    t.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--epochs", type=float, default=1.0, help="passes over the data (default 1)")
    t.add_argument("--max-steps", type=int, help="stop after this many optimiser steps")
    t.add_argument("--batch-size", type=int, default=4, help="pairs per micro-batch (default 4)")
    t.add_argument("--grad-accum", type=int, default=2, help="micro-batches per step (default 2)")
    t.add_argument("--eval-batch-size", type=int)
    t.add_argument("--seed", type=int, default=0)

    r = parser.add_argument_group("run")
    r.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (default: start and end)")
    r.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (default: ~10 %% of the run)")
    r.add_argument("--resume", nargs="?", const="latest",
                   help="continue from a checkpoint folder (no value: the latest under OUT/checkpoints)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--threads", type=int, help="torch CPU threads (on a shared machine 1 can be fastest)")


def config_from_args(args: argparse.Namespace):
    from fsrl.train.config import TrainConfig

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
    return TrainConfig(
        data=args.data, out=args.out, eval_data=args.eval_data, model=args.model, sae=args.sae,
        layer=args.layer, adapter_id=args.adapter_id, loss=args.loss, beta=args.beta,
        gamma=args.gamma, l1=args.l1, l1_warmup=args.l1_warmup, lr=args.lr,
        weight_decay=args.weight_decay, epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, grad_accum=args.grad_accum, eval_batch_size=args.eval_batch_size,
        max_length=args.max_length, activation=args.activation,
        clamp_nonnegative=args.clamp_nonnegative, init_std=args.init_std, seed=args.seed,
        device=args.device, dtype=args.dtype, eval_every=args.eval_every, save_every=args.save_every,
        resume=args.resume, eval_limit=args.eval_limit, progress=not args.no_progress)


def format_summary(s: dict) -> str:
    first = s.get("initial_eval") or {}
    lines = [
        f"adapter written: {s['out']}",
        f"  {s['loss']} beta={s['beta']:g}" + (f" gamma={s['gamma']:g}" if s.get("gamma") is not None else "")
        + f" l1={s['l1_coefficient']:g} (off for the first {s['l1_warmup']:.0%} of steps) lr={s['lr']:g}",
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
