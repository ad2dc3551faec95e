"""`fsrl adapter prune ADAPTER --data PREFS [--min-share S] [--out DIR]`: the adapter cut to the
features it actually pushes on held-out preference pairs, for serving many adapters in less
memory. A feature is kept when its v is non-zero on more than `--min-share` of the data's tokens
(default 0: on at least one token); W, b and tau keep only those columns, and v is zero on every
other feature. The pruned adapter is exact on the kept features; the command reports the share
pruned, the bytes, and the preference loss and accuracy before and after (with the base model's
for scale), and records them in the new adapter.json under `training.pruned`. The loss is
measured on `--eval-data` when given (pairs the choice of columns never saw), else on `--data`
itself, and the record says which."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fsrl.errors import FsrlError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="adapter folder (adapter.json + adapter.safetensors)")
    parser.add_argument("--data", required=True, help="held-out preference pairs, as `fsrl train --data` reads them")
    parser.add_argument("--eval-data", help="pairs to measure the loss change on (default: --data, the pairs "
                        "that chose the columns)")
    parser.add_argument("--min-share", type=float, default=0.0,
                        help="keep a feature when v is non-zero on more than this share of the data's tokens "
                             "(default 0: on at least one)")
    parser.add_argument("--out", help="the pruned adapter's folder (default: ADAPTER-pruned)")
    parser.add_argument("--model", help="base model (default: the embedded default model)")
    parser.add_argument("--sae", help="SAE folder (default: the shipped default SAE)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--limit", type=int, help="use the first N pairs only")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per forward (default 4)")


def run(args: argparse.Namespace) -> int:
    import torch

    from fsrl.adapter import adapter_bytes, load_adapter, prune_adapter, read_adapter_config, save_adapter
    from fsrl.audit import AuditSettings
    from fsrl.files import sha256_of
    from fsrl.models import load_base_model
    from fsrl.sae import default_sae_dir, load_sae
    from fsrl.train.data import PreferenceDataset, load_pairs
    from fsrl.train.trainer import bind_setup, evaluate

    if not 0.0 <= args.min_share < 1.0:
        raise FsrlError(f"--min-share must lie in [0, 1), got {args.min_share}")
    for flag in ("limit", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise FsrlError(f"--{flag.replace('_', '-')} must be at least 1")
    adapter_dir = Path(args.adapter).expanduser()
    config = read_adapter_config(adapter_dir)  # a clear error before the model loads
    if config.columns is not None:
        raise FsrlError(f"{adapter_dir} is pruned already ({config.columns} of {config.d_sae} features)")
    out = Path(args.out).expanduser() if args.out else adapter_dir.with_name(adapter_dir.name + "-pruned")
    if out.exists():
        raise FsrlError(f"{out} exists; pass another --out")
    pairs = load_pairs(args.data, limit=args.limit)
    eval_pairs = load_pairs(args.eval_data) if args.eval_data else None
    base = load_base_model(args.model, device=args.device)
    setup = bind_setup(base, load_sae(Path(args.sae or default_sae_dir()).expanduser(), device=base.device), None)
    adapter = load_adapter(adapter_dir, sae=setup.sae, layer=setup.layer, base_model_fingerprint=base.fingerprint,
                           device=base.device)
    settings = AuditSettings.for_adapter(adapter, batch_size=args.batch_size)
    dataset = PreferenceDataset(pairs, base.tokenizer, settings.max_length)
    cfg = settings.train_config()
    chosen_on = evaluate(base, setup.hook, adapter, dataset, cfg, feature_stats=True)
    share = chosen_on.push.active_share
    keep = (share > 0) if args.min_share == 0 else (share > args.min_share)
    if not bool(keep.any()):
        raise FsrlError(f"no feature is pushed on more than {args.min_share} of the data's tokens: "
                        "nothing would be kept")
    if bool(keep.all()):
        raise FsrlError(f"every feature is pushed on more than {args.min_share} of the data's tokens: "
                        "nothing to prune (a higher --min-share drops the rarest)")
    record = {"min_share": args.min_share, "data": str(args.data), "data_sha256_16": sha256_of(args.data, 16),
              "pairs": chosen_on.pairs, "kept": int(keep.sum()), "d_sae": adapter.config.d_sae}
    pruned = prune_adapter(adapter, keep.nonzero().squeeze(-1), record)
    if eval_pairs is not None:
        dataset = PreferenceDataset(eval_pairs, base.tokenizer, settings.max_length)
        before = evaluate(base, setup.hook, adapter, dataset, cfg)
    else:
        before = chosen_on
    after = evaluate(base, setup.hook, pruned, dataset, cfg)
    unsteered = evaluate(base, setup.hook, None, dataset, cfg)
    record["loss_measured_on"] = ({"data": str(args.eval_data), "sha256_16": sha256_of(args.eval_data, 16),
                                   "pairs": before.pairs} if eval_pairs is not None else "the pairs that chose the columns")
    record.update({
        "pruned_share": round(1 - record["kept"] / record["d_sae"], 4),
        "bytes_before": adapter_bytes(adapter), "bytes_after": adapter_bytes(pruned),
        "loss_before": before.loss, "loss_after": after.loss, "loss_change": after.loss - before.loss,
        "accuracy_before": before.accuracy, "accuracy_after": after.accuracy, "base_loss": unsteered.loss,
        # the dropped features' largest share of tokens pushed: what the pruning leaves out
        "largest_dropped_share": float(share[~keep].max()) if bool((~keep).any()) else 0.0})
    pruned.config.training["pruned"] = record
    with torch.no_grad():
        save_adapter(pruned, out)
    print(f"{adapter.id}: kept {record['kept']} of {record['d_sae']} features "
          f"({100 * record['pruned_share']:.1f} % pruned; {record['bytes_before'] / 2**20:.2f} MiB -> "
          f"{record['bytes_after'] / 2**20:.2f} MiB), chosen on {record['pairs']} pairs")
    print(f"loss on {before.pairs} {'other' if eval_pairs is not None else 'of those'} pairs {before.loss:.4f} -> {after.loss:.4f} (change {record['loss_change']:+.4f}; "
          f"base {unsteered.loss:.4f}), accuracy {before.accuracy:.3f} -> {after.accuracy:.3f}")
    print(json.dumps(record))
    print(f"wrote {out}")
    return 0
