"""`fsrl features contrast` and `fsrl adapter constant`: steering found without training.

    fsrl features contrast A.jsonl B.jsonl [--model M] [--sae DIR] [--top 20] [--out FILE.json]
                           [--adapter-out DIR --adapter-top 16 --adapter-scale 1.0]
        the features that tell two sets of texts apart (fsrl.contrast); with --adapter-out, a
        constant adapter pushing the top ones (v_j = scale * (mean_a_j - mean_b_j))
    fsrl adapter constant --push J=VALUE [--push ...] --out DIR [--model M] [--sae DIR]
        a constant adapter from a list of pushes
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fsrl.errors import FsrlError


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="the SAE's model (default: the embedded default model)")
    parser.add_argument("--sae", help="SAE folder (default: the shipped default SAE)")
    parser.add_argument("--layer", type=int, help="hook layer (default: the SAE's)")
    parser.add_argument("--device", default="auto")


def add_contrast_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", help='JSON Lines: a string, {"text": ...} or {"messages": [...]} per line')
    parser.add_argument("b", help="the same, for the other set")
    _model_arguments(parser)
    parser.add_argument("--top", type=int, default=20, help="features to report (default 20)")
    parser.add_argument("--out", help="also write the contrast as JSON here")
    parser.add_argument("--adapter-out", help="write a constant adapter pushing the top features into this folder")
    parser.add_argument("--adapter-top", type=int, default=16, help="features the adapter pushes (default 16)")
    parser.add_argument("--adapter-scale", type=float, default=1.0, help="v_j = scale * diff_j (default 1)")


def add_constant_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--push", action="append", default=[], metavar="J=VALUE",
                        help="push feature J by VALUE at every position; repeatable")
    parser.add_argument("--out", required=True, help="the adapter folder to write")
    _model_arguments(parser)


def _load(args: argparse.Namespace):
    from fsrl.models import load_base_model
    from fsrl.sae import default_sae_dir, load_sae

    base = load_base_model(args.model, device=args.device)
    sae = load_sae(Path(args.sae or default_sae_dir()).expanduser(), device=base.device, dtype=base.dtype)
    return base, sae, sae.site_at(args.layer)


def _save(base, sae, site, out: str, pushes: dict[int, float], built_from: dict) -> Path:
    from fsrl.adapter import constant_adapter, save_adapter

    folder = Path(out).expanduser()
    adapter = constant_adapter(folder.name, sae, base.name, base.fingerprint, site.layer, pushes, built_from)
    return save_adapter(adapter, folder)


def run_contrast(args: argparse.Namespace) -> int:
    from fsrl.contrast import constant_push, contrast, read_texts, text_features, text_token_ids

    texts = {name: read_texts(path) for name, path in (("a", args.a), ("b", args.b))}
    if args.top < 1 or args.adapter_top < 1:
        raise FsrlError("--top and --adapter-top must be at least 1")
    base, sae, site = _load(args)
    features = {name: text_features(base, sae, site, [text_token_ids(base.tokenizer, t) for t in items])
                for name, items in texts.items()}
    found = contrast(features["a"], features["b"], max(args.top, args.adapter_top))
    print(f"{len(texts['a'])} texts in A, {len(texts['b'])} in B; at {site}; ranked by |mean A - mean B|")
    print(f"{'feature':>8} {'mean A':>10} {'mean B':>10} {'diff':>10} {'d':>8} {'p':>9}  label")
    for c in found[:args.top]:
        d = f"{c.effect_size:8.2f}" if c.effect_size is not None else f"{'-':>8}"
        p = f"{c.p_value:9.2g}" if c.p_value is not None else f"{'-':>9}"
        print(f"{c.index:>8} {c.mean_a:10.4f} {c.mean_b:10.4f} {c.diff:10.4f} {d} {p}  {sae.label(c.index) or ''}")
    if args.out:
        Path(args.out).write_text(json.dumps({"a": args.a, "b": args.b, "site": str(site),
                                              "features": [c.to_json() for c in found[:args.top]]}, indent=2) + "\n")
        print(f"written to {args.out}")
    if args.adapter_out:
        pushes = constant_push(found, args.adapter_top, args.adapter_scale)
        folder = _save(base, sae, site, args.adapter_out, pushes, {
            "kind": "contrast", "a": args.a, "b": args.b, "top": args.adapter_top, "scale": args.adapter_scale,
            "features": [c.to_json() for c in found[:args.adapter_top]]})
        print(f"constant adapter pushing {len(pushes)} features written to {folder}")
    return 0


def run_constant(args: argparse.Namespace) -> int:
    pushes: dict[int, float] = {}
    for spec in args.push:
        index, sep, value = spec.partition("=")
        try:
            j, v = int(index), float(value)
        except ValueError:
            raise FsrlError(f"--push {spec!r}: expected J=VALUE (a feature index and a number)") from None
        if not sep or j in pushes:
            raise FsrlError(f"--push {spec!r}: expected J=VALUE, one per feature")
        pushes[j] = v
    if not pushes:
        raise FsrlError("give at least one --push J=VALUE")
    base, sae, site = _load(args)
    folder = _save(base, sae, site, args.out, pushes, {"kind": "features",
                                                       "features": [{"index": j, "value": v} for j, v in pushes.items()]})
    print(f"constant adapter pushing {len(pushes)} features written to {folder}")
    return 0
