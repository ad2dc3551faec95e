"""`fsrl features build` and `fsrl features label`: readable features for an SAE.

    fsrl features build [--sae DIR] [--model M] --text CORPUS [--chat RESPONSES.jsonl] ...
        dashboards for every feature (fsrl.features.dashboards), then a rule label for every
        live feature; both written beside the SAE (or into --out)
    fsrl features label [--sae DIR] (--labeler-url URL --labeler-model M | --neuronpedia FILE)
        labels from an OpenAI-compatible endpoint or from Neuronpedia explanations, over the
        rule labels (each records its source)
    fsrl features classify [--sae DIR] --labeler-url URL --labeler-model M [--limit N]
        the paper's classes from an OpenAI-compatible endpoint, over the rule's classes
        (written to feature_classes.json beside the SAE)
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator
from pathlib import Path

from fsrl.errors import FsrlError

log = logging.getLogger(__name__)


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sae", help="SAE folder (default: the shipped default SAE)")
    parser.add_argument("--model", help="the SAE's model (default: the embedded default model)")
    parser.add_argument("--layer", type=int, help="hook layer (default: the SAE's)")
    parser.add_argument("--text", action="append", default=[],
                        help="a corpus spec, as for `fsrl sae train` (a .txt file, a folder of them, "
                             "a `datasets` folder, builtin:system-docs); repeatable")
    parser.add_argument("--chat", action="append", default=[],
                        help="JSON Lines of {\"prompt\", \"text\"} (a user turn and the model's answer), "
                             "read through the model's chat template; repeatable")
    parser.add_argument("--out", help="where to write (default: the SAE folder)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=12,
                        help="top activating contexts kept per feature (the file shows the 8 best distinct ones)")
    parser.add_argument("--max-tokens", type=int, help="stop after this many corpus tokens")
    parser.add_argument("--no-resume", action="store_true", help="start over even if a saved state exists")
    parser.add_argument("--no-labels", action="store_true", help="dashboards only")
    parser.add_argument("--no-progress", action="store_true")


def add_label_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sae", help="SAE folder with dashboards (default: the shipped default SAE)")
    parser.add_argument("--labeler-url", help="base URL of an OpenAI-compatible API, such as "
                                              "http://localhost:8001/v1 (key: $FSRL_LABELER_KEY or $OPENAI_API_KEY)")
    parser.add_argument("--labeler-model", help="the model to ask, with --labeler-url")
    parser.add_argument("--limit", type=int, help="label only the first N live features")
    parser.add_argument("--neuronpedia", help="Neuronpedia explanations export (.json, .jsonl or .jsonl.gz)")
    parser.add_argument("--no-progress", action="store_true")


def add_classify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sae", help="SAE folder with dashboards (default: the shipped default SAE)")
    parser.add_argument("--labeler-url", required=True, help="base URL of an OpenAI-compatible API, such as "
                        "http://localhost:8001/v1 (key: $FSRL_LABELER_KEY or $OPENAI_API_KEY)")
    parser.add_argument("--labeler-model", required=True, help="the model to ask")
    parser.add_argument("--limit", type=int, help="classify only the first N live features")
    parser.add_argument("--no-progress", action="store_true")


def run_build(args: argparse.Namespace) -> int:
    from fsrl.features import dashboards
    from fsrl.features.labels import rule_labels
    from fsrl.models import load_base_model
    from fsrl.sae import default_sae_dir, load_sae, write_labels

    if not args.text and not args.chat:
        raise FsrlError("give a corpus: --text SPEC and/or --chat FILE")
    sae_dir = Path(args.sae or default_sae_dir()).expanduser()
    base = load_base_model(args.model, device=args.device)
    sae = load_sae(sae_dir, device=base.device, dtype=base.dtype)
    layer = args.layer if args.layer is not None else sae.info.layer
    if layer is None:
        raise FsrlError(f"SAE {sae.info.name} names no hook layer; pass --layer")
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    settings = dashboards.BuildSettings(
        context_size=args.context_size, batch_size=args.batch_size, top_k=args.top_k,
        max_tokens=args.max_tokens,
        exclude_norm_above=(cfg.get("metadata") or {}).get("excluded_activation_norm_above"))
    corpus = " + ".join([*args.text, *(f"chat:{c}" for c in args.chat)])

    def documents() -> Iterator[str]:
        from fsrl.corpus import chat_documents, load_documents

        for spec in args.text:
            yield from load_documents(spec)
        for path in args.chat:
            yield from chat_documents(path, base.tokenizer)

    out = Path(args.out).expanduser() if args.out else sae_dir
    token_text = base.tokenizer.batch_decode([[i] for i in range(len(base.tokenizer))])
    path = dashboards.build(base, sae, layer, documents(), corpus, out, settings, token_text,
                            resume=not args.no_resume, progress=not args.no_progress)
    doc = dashboards.read(out, sae)
    live = sum(1 for f in doc["features"] if f.get("top_contexts"))
    print(f"dashboards for {len(doc['features'])} features ({live} fired on {doc['tokens']} tokens) in {path}")
    if not args.no_labels:
        labels = rule_labels(doc)
        write_labels(out, labels)
        print(f"rule labels for {len(labels)} features in {out / 'feature_labels.json'}")
    return 0


def run_label(args: argparse.Namespace) -> int:
    from fsrl.features import dashboards
    from fsrl.features.labels import llm_labels, neuronpedia_labels
    from fsrl.sae import default_sae_dir, load_sae, read_labels, write_labels

    if not (args.labeler_url or args.neuronpedia):
        raise FsrlError("give --labeler-url with --labeler-model, or --neuronpedia FILE")
    if args.labeler_url and not args.labeler_model:
        raise FsrlError("--labeler-url needs --labeler-model")
    sae_dir = Path(args.sae or default_sae_dir()).expanduser()
    sae = load_sae(sae_dir)
    labels = read_labels(sae_dir)
    if args.neuronpedia:
        found = neuronpedia_labels(args.neuronpedia, sae.d_sae)
        labels.update(found)
        print(f"{len(found)} labels from {args.neuronpedia}")
    if args.labeler_url:
        doc = dashboards.read(sae_dir, sae)
        if doc is None:
            raise FsrlError(f"no dashboards in {sae_dir}: run `fsrl features build` first")
        found, failed = llm_labels(doc, args.labeler_url, args.labeler_model, limit=args.limit,
                                   progress=not args.no_progress)
        labels.update(found)
        print(f"{len(found)} labels from {args.labeler_model} ({failed} features got none and keep their label)")
    write_labels(sae_dir, labels)
    return 0


def run_classify(args: argparse.Namespace) -> int:
    from fsrl.features import dashboards
    from fsrl.features.classes import llm_classes, read_classes, write_classes
    from fsrl.sae import default_sae_dir, load_sae

    sae_dir = Path(args.sae or default_sae_dir()).expanduser()
    sae = load_sae(sae_dir)
    doc = dashboards.read(sae_dir, sae)
    if doc is None:
        raise FsrlError(f"no dashboards in {sae_dir}: run `fsrl features build` first")
    found, failed = llm_classes(doc, sae.info.labels, args.labeler_url, args.labeler_model, limit=args.limit,
                                progress=not args.no_progress)
    stored = read_classes(sae_dir)
    stored.update(found)
    path = write_classes(sae_dir, stored)
    counts = {c: sum(1 for v, _ in found.values() if v == c) for c in ("alignment", "style", "other")}
    print(f"{len(found)} classes from {args.labeler_model} ({counts}; {failed} features got none and keep "
          f"the rule's) in {path}")
    return 0
