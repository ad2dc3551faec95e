"""`fsrl sae evaluate --chat FILE [--text SPEC]`: an SAE's explained variance and CE loss
recovered on other text than it was trained on, one corpus at a time, written into its
quality.json under "by_corpus" (the training-time figures, on held-out training text, stay)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fsrl.errors import FsrlError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sae", help="SAE folder (default: the shipped default SAE)")
    parser.add_argument("--model", help="the SAE's model (default: the embedded default model)")
    parser.add_argument("--chat", action="append", default=[],
                        help='a JSON Lines file of {"prompt", "text"} rows, read as chat (repeatable)')
    parser.add_argument("--text", action="append", default=[],
                        help="a text corpus spec, as `fsrl sae train --text` reads it (repeatable)")
    parser.add_argument("--eval-tokens", type=int, default=32_768, help="tokens per corpus (default 32768)")
    parser.add_argument("--ce-tokens", type=int, default=4_096, help="of those, tokens for CE loss (default 4096)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-write", action="store_true", help="print only; leave quality.json as it is")


def run(args: argparse.Namespace) -> int:
    from fsrl.corpus import chat_documents, load_documents
    from fsrl.models import load_base_model
    from fsrl.sae import SAE_CFG_FILE, default_sae_dir, load_sae
    from fsrl.sae_training.evaluation import evaluate_sae, pack_contexts
    from fsrl.sae_training.exclusions import Exclusions, separator_token_id

    if not args.chat and not args.text:
        raise FsrlError("give a corpus: --chat FILE and/or --text SPEC")
    if args.eval_tokens < 1 or args.ce_tokens < 1:
        raise FsrlError("--eval-tokens and --ce-tokens must be at least 1")
    sae_dir = Path(args.sae or default_sae_dir()).expanduser()
    meta = (json.loads((sae_dir / SAE_CFG_FILE).read_text()).get("metadata") or {})
    base = load_base_model(args.model, device=args.device)
    sae = load_sae(sae_dir, device=base.device)
    layer = sae.info.layer
    if layer is None:
        raise FsrlError(f"SAE {sae.info.name} names no hook layer")
    # The positions the SAE was trained without are left out here too (its cfg.json says which).
    excl = Exclusions(token_ids=list(meta.get("excluded_token_ids") or []),
                      norm_threshold=meta.get("excluded_activation_norm_above"))
    context = int(meta.get("context_size") or 128)
    separator = separator_token_id(base.tokenizer)
    corpora = [(f"chat:{c}", list(chat_documents(c, base.tokenizer))) for c in args.chat]
    corpora += [(spec, list(load_documents(spec))) for spec in args.text]
    results = {}
    for name, rows in corpora:
        tokens = pack_contexts(base.tokenizer, rows, context, separator, args.eval_tokens)
        results[name] = evaluate_sae(base, sae, layer, tokens, excl, ce_tokens=args.ce_tokens)
    print(f"{'corpus':<48} {'EV':>7} {'L0':>6} {'CE clean':>9} {'spliced':>8} {'recovered':>9}")
    for name, q in results.items():
        recovered = "-" if q["ce_loss_recovered"] is None else f"{q['ce_loss_recovered']:.3f}"
        print(f"{name[-48:]:<48} {q['explained_variance']:>7.3f} {q['l0_mean']:>6.1f} {q['ce_loss_clean']:>9.3f} "
              f"{q['ce_loss_spliced']:>8.3f} {recovered:>9}")
    if not args.no_write:
        path = sae_dir / "quality.json"
        quality = json.loads(path.read_text()) if path.exists() else {}
        quality.setdefault("by_corpus", {}).update(results)
        path.write_text(json.dumps(quality, indent=2) + "\n")
        print(f"wrote {path} (by_corpus)")
    return 0
