"""`fsrl analyze ADAPTER --data PREFS [--out DIR]`: the paper's audit of one adapter
(fsrl.audit), written as report.json and a self-contained report.html."""

from __future__ import annotations

import argparse
from pathlib import Path

from fsrl.errors import FsrlError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="adapter folder (adapter.json + adapter.safetensors)")
    parser.add_argument("--data", required=True, help="preference pairs, as `fsrl train --data` reads them "
                        "(held-out pairs: the adapter never trained on them)")
    parser.add_argument("--out", help="report folder (default: ADAPTER/analysis, where the server's "
                        "/adapters/{id}/card finds it)")
    parser.add_argument("--model", help="base model (default: the embedded default model)")
    parser.add_argument("--sae", help="SAE folder with dashboards (default: the shipped default SAE)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--limit", type=int, help="use the first N pairs only")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per forward (default 4)")
    parser.add_argument("--seeds", type=int, default=5, help="random same-size ablation sets per class (default 5)")
    parser.add_argument("--fractions", default="0.01,0.02,0.05,0.1,0.25,0.5",
                        help="steering fractions to sweep, besides 0 and 1 (comma-separated)")
    parser.add_argument("--top", type=int, default=20, help="top steered features to list (default 20)")
    parser.add_argument("--l1", type=float, help="lambda for the loss with L1 (default: the adapter's training)")
    parser.add_argument("--no-progress", action="store_true")


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise FsrlError(f"--fractions: expected numbers separated by commas, got {text!r}") from None
    if not values or not all(0.0 < v < 1.0 for v in values):
        raise FsrlError(f"--fractions: each must lie strictly between 0 and 1, got {text!r}")
    return values


def run(args: argparse.Namespace) -> int:
    from fsrl import __version__
    from fsrl.adapter import WEIGHTS_FILE, load_adapter, read_adapter_config
    from fsrl.audit import AuditSettings, audit
    from fsrl.audit_report import ANALYSIS_DIR, write_report
    from fsrl.features import dashboards
    from fsrl.features.classes import feature_classes, read_classes
    from fsrl.files import sha256_of
    from fsrl.models import load_base_model
    from fsrl.sae import default_sae_dir, load_sae
    from fsrl.train.data import PreferenceDataset, load_pairs
    from fsrl.train.trainer import bind_setup

    fractions = _fractions(args.fractions)
    for flag in ("limit", "batch_size", "top"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise FsrlError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.seeds < 0:
        raise FsrlError("--seeds must be 0 or more")
    adapter_dir = Path(args.adapter).expanduser()
    read_adapter_config(adapter_dir)  # a clear error before the model loads
    sae_dir = Path(args.sae or default_sae_dir()).expanduser()
    sae = load_sae(sae_dir)
    doc = dashboards.read(sae_dir, sae)  # checked against this SAE's fingerprint
    if doc is None:
        raise FsrlError(f"SAE {sae_dir} has no feature dashboards to classify features by; "
                        "run `fsrl features build` first")
    classes = {i: c for i, (c, _) in feature_classes(doc, read_classes(sae_dir)).items()}
    pairs = load_pairs(args.data, limit=args.limit)

    base = load_base_model(args.model, device=args.device)
    if base.device.type != "cpu":  # read once more only where it must move
        sae = load_sae(sae_dir, device=base.device)
    setup = bind_setup(base, sae, None)
    adapter = load_adapter(adapter_dir, sae=setup.sae, layer=setup.layer,
                           base_model_fingerprint=base.fingerprint, device=base.device)
    settings = AuditSettings.for_adapter(adapter, batch_size=args.batch_size, random_seeds=args.seeds,
                                         fractions=fractions, top=args.top, l1=args.l1)
    dataset = PreferenceDataset(pairs, base.tokenizer, settings.max_length)
    report = audit(setup, adapter, dataset, classes, settings, progress=not args.no_progress)
    report.meta = {
        "adapter": {"id": adapter.id, "path": str(adapter_dir),
                    "weights_sha256_16": sha256_of(adapter_dir / WEIGHTS_FILE, 16)},
        "model": base.name, "sae": setup.sae.info.name,
        "data": {"path": str(args.data), "pairs": len(pairs),
                 "sha256_16": sha256_of(args.data, 16)},
        "fsrl_version": __version__,
    }
    out = Path(args.out).expanduser() if args.out else adapter_dir / ANALYSIS_DIR
    json_path, html_path = write_report(report.to_json(), out)
    s = report.summary()
    print(f"{adapter.id}: eval loss {s['eval_loss']} (with L1 {s['eval_loss_with_l1']}), base {s['base_loss']}, "
          f"mean L0 {s['mean_l0']} ({100 * s['mean_l0_share_of_width']:.1f} % of the width)")
    print(f"wrote {json_path} and {html_path}")
    return 0
