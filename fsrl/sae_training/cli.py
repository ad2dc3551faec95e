"""`fsrl sae train`: its flags, and the summary it prints (the pipeline: fsrl.sae_training.pipeline)."""

from __future__ import annotations

import argparse

from fsrl.sae_training.config import ARCHITECTURES, SaeTrainConfig
from fsrl.sae_training.pipeline import train_sae


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", required=True,
                        help="corpus: a .txt file, a folder of .txt files, a `datasets` folder "
                             "(save_to_disk, column `text`), or builtin:system-docs")
    parser.add_argument("--layer", type=int, required=True,
                        help="hook layer L: the residual stream after decoder layer L")
    parser.add_argument("--out", required=True, help="output SAE folder")
    parser.add_argument("--model", default=None, help="base model (default: the embedded one)")
    parser.add_argument("--d-sae", type=int, default=4608, help="number of features")
    parser.add_argument("--architecture", default="topk", choices=sorted(ARCHITECTURES))
    parser.add_argument("--k", type=int, default=64, help="active features per token (topk)")
    parser.add_argument("--aux-k-coefficient", type=float, default=1.0,
                        help="weight of the AuxK loss that revives dead features (topk; 0: off)")
    parser.add_argument("--sparsity-coefficient", type=float, default=None,
                        help="L1 (standard) or L0 (jumprelu) coefficient; default: sae-lens's")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--lr-decay-fraction", type=float, default=0.2,
                        help="decay the learning rate linearly to 0 over this last share of steps")
    parser.add_argument("--batch-size", type=int, default=1024, help="tokens per SAE step")
    parser.add_argument("--training-tokens", type=int, default=2_000_000,
                        help="tokens the SAE is trained on (steps = this / batch size)")
    parser.add_argument("--unique-tokens", type=int, default=0,
                        help="collect this many activations once and train over them for "
                             "--training-tokens (epochs); 0: fresh activations every batch")
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--store-batch-size", type=int, default=32,
                        help="contexts per model forward pass when collecting activations")
    parser.add_argument("--dead-feature-window", type=int, default=100,
                        help="steps without firing after which a feature counts as dead (AuxK)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                        help="dtype of the saved weights")
    parser.add_argument("--eval-tokens", type=int, default=32_768,
                        help="held-out tokens for explained variance, L0 and dead features")
    parser.add_argument("--ce-tokens", type=int, default=4_096,
                        help="held-out tokens for the CE-loss figures (3 full forward passes)")
    parser.add_argument("--eval-fraction", type=float, default=0.05,
                        help="share of corpus chunks held out from training")
    parser.add_argument("--max-norm-ratio", type=float, default=10.0,
                        help="leave out positions whose activation norm exceeds this many times "
                             "the median (attention sinks); 0: keep them")
    parser.add_argument("--name", default=None, help="SAE name in cfg.json (default: derived)")
    parser.add_argument("--activation-cache", default=None, metavar="DIR",
                        help="with --unique-tokens: keep the collected activations in DIR and "
                             "reuse them when a later run asks for the same ones (sweeps)")


def run(args: argparse.Namespace) -> int:
    fields = SaeTrainConfig.__dataclass_fields__
    cfg = SaeTrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    quality = train_sae(cfg)
    print(format_summary(quality))
    return 0


def format_summary(q: dict) -> str:
    """The quality record as the table `fsrl sae train` prints."""
    rec = q.get("ce_loss_recovered")
    rows = [
        ("SAE", f"{q['sae']}  ({q['architecture']}, d_sae {q['d_sae']}, {q['hook_name']})"),
        ("tokens trained", f"{q['tokens_trained']:,} ({q['unique_tokens_trained']:,} unique)"),
        ("explained variance",
         f"{q['explained_variance']:.3f}  (held-out, {q['eval_tokens']:,} tokens)"),
        ("mean L0", f"{q['l0_mean']:.1f}"),
        ("dead features",
         f"{q['dead_feature_share']:.1%}  ({q['dead_features']} never active on held-out)"),
        ("CE loss clean", f"{q['ce_loss_clean']:.3f}"),
        ("CE loss spliced", f"{q['ce_loss_spliced']:.3f}"),
        ("CE loss zero-abl.", f"{q['ce_loss_zero_ablation']:.3f}"),
        ("CE loss recovered", f"{rec:.1%}" if rec is not None else "n/a"),
        ("time", f"train {q['timing_s']['train']:.0f} s, eval {q['timing_s']['eval']:.0f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
