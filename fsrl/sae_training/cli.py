"""`fsrl sae train`: its flags, and the summary it prints (the pipeline: fsrl.sae_training.pipeline)."""

from __future__ import annotations

import argparse

from fsrl.cli_options import ConfigOptions
from fsrl.sae_training.config import ARCHITECTURES, SaeTrainConfig
from fsrl.sae_training.pipeline import train_sae


# Defaults live in SaeTrainConfig; every option that fills one of its fields takes that default.
OPTIONS = ConfigOptions(SaeTrainConfig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = OPTIONS.add
    add(parser, "--text",
        help="corpus: a .txt file, a folder of .txt files, a `datasets` folder "
             "(save_to_disk, column `text`), or builtin:system-docs")
    add(parser, "--chat", metavar="FILE.jsonl",
        help='chat text mixed into the corpus: {"prompt", "text"} rows, each rendered by the '
             "model's chat template")
    add(parser, "--chat-share", type=float,
        help="share of the training characters that are chat, while the chat lasts")
    add(parser, "--layer", type=int, help="hook layer L: the residual stream after decoder layer L")
    add(parser, "--out", help="output SAE folder")
    add(parser, "--model", help="base model (default: the embedded one)")
    add(parser, "--d-sae", type=int, help="number of features")
    add(parser, "--architecture", choices=sorted(ARCHITECTURES))
    add(parser, "--k", type=int, help="active features per token (topk)")
    add(parser, "--aux-k-coefficient", type=float,
        help="weight of the AuxK loss that revives dead features (topk; 0: off)")
    add(parser, "--sparsity-coefficient", type=float,
        help="L1 (standard) or L0 (jumprelu) coefficient; default: sae-lens's")
    add(parser, "--lr", type=float)
    add(parser, "--lr-decay-fraction", type=float,
        help="decay the learning rate linearly to 0 over this last share of steps")
    add(parser, "--batch-size", type=int, help="tokens per SAE step")
    add(parser, "--training-tokens", type=int,
        help="tokens the SAE is trained on (steps = this / batch size)")
    add(parser, "--unique-tokens", type=int,
        help="collect this many activations once and train over them for "
             "--training-tokens (epochs); 0: fresh activations every batch")
    add(parser, "--context-size", type=int)
    add(parser, "--store-batch-size", type=int,
        help="contexts per model forward pass when collecting activations")
    add(parser, "--dead-feature-window", type=int,
        help="steps without firing after which a feature counts as dead (AuxK)")
    add(parser, "--device", help="auto | cpu | cuda[:N]")
    add(parser, "--seed", type=int)
    add(parser, "--dtype", choices=["float16", "bfloat16", "float32"],
        help="dtype of the saved weights")
    add(parser, "--eval-tokens", type=int,
        help="held-out tokens for explained variance, L0 and dead features")
    add(parser, "--ce-tokens", type=int,
        help="held-out tokens for the CE-loss figures (3 full forward passes)")
    add(parser, "--eval-fraction", type=float, help="share of corpus chunks held out from training")
    add(parser, "--max-norm-ratio", type=float,
        help="leave out positions whose activation norm exceeds this many times "
             "the median (attention sinks); 0: keep them")
    add(parser, "--name", help="SAE name in cfg.json (default: derived)")
    add(parser, "--activation-cache", metavar="DIR",
        help="with --unique-tokens: keep the collected activations in DIR and "
             "reuse them when a later run asks for the same ones (sweeps)")


def run(args: argparse.Namespace) -> int:
    quality = train_sae(OPTIONS.config(args))
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
