"""`fsrl sae train`: train an SAE with sae-lens's own runner on a local model and a local corpus.

The pipeline, top to bottom:
1. corpus -> chunked, shuffled text rows (fsrl.corpus); a few held out for evaluation.
2. our base model (fsrl.models.load_base_model), wrapped in sae-lens's HookedProxyLM with a
   hook on `model.layers.L` (the residual stream after decoder layer L).
3. sae-lens's LanguageModelSAETrainingRunner trains the SAE (`runner`). The dataset goes in as
   an object (`override_dataset`), never as a hub name or path; wandb is off. Either the runner
   streams fresh activations from the model for every batch (`--unique-tokens 0`), or we first
   collect `--unique-tokens` activations once with sae-lens's ActivationsStore, write them as a
   local activation cache (`cache`), and the runner trains over that cache for
   `--training-tokens` (several epochs). On a CPU the model's forward pass is the bottleneck,
   so the cache buys steps.
4. the SAE is written in sae-lens's disk format (optionally float16; `writer`), then evaluated
   with our own reader (fsrl.sae.load_sae) on held-out text (`evaluation`), so `quality.json`
   describes exactly what we serve.

Positions left out of training and of every figure, and how documents are joined into
contexts: `exclusions`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from fsrl.errors import FsrlError
from fsrl.sae_training.config import SaeTrainConfig, check_config, rebuild_command, sae_name
from fsrl.sae_training.evaluation import evaluate_sae, pack_contexts, sae_lens_parity
from fsrl.sae_training.exclusions import Exclusions, separator_token_id
from fsrl.sae_training.runner import run_sae_lens, sae_lens_version
from fsrl.sae_training.writer import write_output

log = logging.getLogger(__name__)

QUALITY_FILE = "quality.json"
QUALITY_FORMAT = "fsrl-sae-quality/1"


def corpus_sources(cfg: SaeTrainConfig, text_rows: list[str],
                   tokenizer) -> dict[str, tuple[list[str], list[str]]]:
    """Each source of the corpus (the text spec, and the chat file when there is one) as
    (held-out rows, training rows): shuffled with the seed, the first `eval_fraction` held out,
    so each source is held out in the same share."""
    import random

    from fsrl import corpus

    sources = {cfg.text: text_rows}
    if cfg.chat:
        chat_rows = list(corpus.chat_documents(cfg.chat, tokenizer))
        random.Random(cfg.seed).shuffle(chat_rows)
        sources[f"chat:{cfg.chat}"] = chat_rows
    out = {}
    for name, rows in sources.items():
        if len(rows) < 2:
            raise FsrlError(f"corpus {name!r} is too small: it needs at least two paragraphs")
        n_held = max(1, round(len(rows) * cfg.eval_fraction))
        out[name] = (rows[:n_held], rows[n_held:])
        log.info("corpus %s: %d rows (%d held out for evaluation)", name, len(rows), n_held)
    return out


def trained_chat_share(tokenizer, rows: list[str], chat_rows: set[str], tokens: int) -> float:
    """Roughly the share of chat among the tokens training read: the rows in order, tokenised,
    up to `tokens` (sae-lens packs them into contexts; exclusions are not counted)."""
    seen = chat = 0
    for row in rows:
        n = len(tokenizer(row, add_special_tokens=False)["input_ids"])
        seen += n
        chat += n if row in chat_rows else 0
        if seen >= tokens:
            break
    return round(chat / max(seen, 1), 4)


def train_sae(cfg: SaeTrainConfig) -> dict:
    """Train, save and evaluate; returns the quality record written to OUT/quality.json."""
    arch = check_config(cfg)
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from fsrl import corpus
    from fsrl.models import load_base_model, resolve_device

    out = Path(cfg.out).expanduser()
    if out.exists() and not out.is_dir():
        raise FsrlError(f"--out {out} exists and is not a folder")
    t_start = time.time()
    torch.manual_seed(cfg.seed)
    text_rows = corpus.load_rows(cfg.text, seed=cfg.seed)  # before the model: a bad corpus fails fast
    if cfg.chat and not Path(cfg.chat).expanduser().is_file():
        raise FsrlError(f"chat file not found: {cfg.chat}")
    device = resolve_device(cfg.device)
    base = load_base_model(cfg.model, device=device)
    n_layers = len(base.layers)
    if not 0 <= cfg.layer < n_layers:
        raise FsrlError(f"--layer {cfg.layer} is out of range: {base.name} has {n_layers} "
                        f"layers (0..{n_layers - 1})")
    hook_name = f"model.layers.{cfg.layer}"
    sources = corpus_sources(cfg, text_rows, base.tokenizer)
    text_held, text_train = sources[cfg.text]
    chat_held, chat_train = sources.get(f"chat:{cfg.chat}", ([], []))
    held_rows = corpus.mix_rows(text_held, chat_held, cfg.chat_share)
    train_rows = corpus.mix_rows(text_train, chat_train, cfg.chat_share)
    separator = separator_token_id(base.tokenizer)
    excl = Exclusions(token_ids=sorted(set(getattr(base.tokenizer, "all_special_ids", []) or [])
                                       | ({separator} if separator is not None else set())))

    with tempfile.TemporaryDirectory(prefix="fsrl-sae-") as tmp:
        t_train = time.time()
        trained_dir, tokens_trained = run_sae_lens(cfg, arch, base, hook_name, separator, excl,
                                                   train_rows, Path(tmp), str(device))
        t_train = time.time() - t_train
        name = sae_name(cfg, arch, base.name)
        write_output(trained_dir, out, cfg, name, base, excl)

    from fsrl.sae import load_sae

    sae = load_sae(out, device=device)
    t_eval = time.time()
    tokens = pack_contexts(base.tokenizer, held_rows, cfg.context_size, separator,
                           cfg.eval_tokens)
    figures = evaluate_sae(base, sae, cfg.layer, tokens, excl, ce_tokens=cfg.ce_tokens)
    figures["sae_lens_parity_max_abs_diff"] = sae_lens_parity(out, sae, base, cfg.layer,
                                                              tokens[:4], excl)
    if cfg.chat:  # each source's held-out rows apart: prose and chat are fitted differently
        figures["by_corpus"] = {
            f"held-out {name}": evaluate_sae(
                base, sae, cfg.layer,
                pack_contexts(base.tokenizer, held, cfg.context_size, separator, cfg.eval_tokens),
                excl, ce_tokens=cfg.ce_tokens)
            for name, (held, _) in sources.items()}
        figures["trained_chat_share"] = trained_chat_share(
            base.tokenizer, train_rows, set(chat_train), cfg.unique_tokens
            or cfg.training_tokens)
    quality = {
        "format": QUALITY_FORMAT,
        "sae": name, "model": base.name, "model_fingerprint": base.fingerprint,
        "sae_fingerprint": sae.info.fingerprint, "hook_name": hook_name, "layer": cfg.layer,
        "architecture": arch.name, "d_in": base.d_model, "d_sae": cfg.d_sae,
        **figures,
        "tokens_trained": tokens_trained,
        "unique_tokens_trained": cfg.unique_tokens if 0 < cfg.unique_tokens < tokens_trained
        else tokens_trained,
        "excluded_from_training_and_eval": excl.to_json(),
        "ce_loss_recovered_baseline": (
            "zero ablation: the residual at the hook is set to 0 at every evaluated position; "
            "recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean)"),
        "explained_variance_definition": (
            "1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over held-out tokens, "
            "excluded positions left out"),
        # out and the activation cache are paths on this machine, not part of the recipe
        "training": {k: v for k, v in asdict(cfg).items() if k not in ("out", "activation_cache")},
        "command": rebuild_command(cfg),
        "timing_s": {"train": round(t_train, 1), "eval": round(time.time() - t_eval, 1),
                     "total": round(time.time() - t_start, 1)},
        "device": str(device), "torch_threads": torch.get_num_threads(),
        "sae_lens_version": sae_lens_version(),
    }
    (out / QUALITY_FILE).write_text(json.dumps(quality, indent=2) + "\n")
    return quality
