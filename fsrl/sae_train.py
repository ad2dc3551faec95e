"""`fsrl sae train`: train an SAE with sae-lens's own runner on a local model and a local corpus.

The pipeline, top to bottom:
1. corpus -> chunked, shuffled text rows (fsrl.corpus); a few held out for evaluation.
2. our base model (fsrl.models.load_base_model), wrapped in sae-lens's HookedProxyLM with a
   hook on `model.layers.L` (the residual stream after decoder layer L).
3. sae-lens's LanguageModelSAETrainingRunner trains the SAE. The dataset goes in as an object
   (`override_dataset`), never as a hub name or path; wandb is off. Either the runner streams
   fresh activations from the model for every batch (`--unique-tokens 0`), or we first collect
   `--unique-tokens` activations once with sae-lens's ActivationsStore, write them as a local
   activation cache, and the runner trains over that cache for `--training-tokens` (several
   epochs). On a CPU the model's forward pass is the bottleneck, so the cache buys steps.
4. the SAE is written in sae-lens's disk format (optionally float16), then evaluated with our
   own reader (fsrl.sae.load_sae) on held-out text, so `quality.json` describes exactly what
   we serve.

Excluded positions: at a middle layer the first position of every context and the document
separator carry activation norms ~100x the median (~97 % of the variance in 0.2-0.8 % of
tokens), and now and then another token turns into such an attention sink too (a newline right
after a newline at position 0, say). Left in, these few tokens dominate both the training loss
and explained variance. So three rules, the same in training and in every evaluation figure:
position 0 is dropped (seqpos_slice=(1, None)), every special token id is dropped, and so is
any position whose activation norm exceeds `--max-norm-ratio` times the median norm (measured
once on the first batch; the absolute threshold is saved in cfg.json and quality.json). When
the SAE is spliced in for the CE figures, excluded positions keep their exact activation, as
the steering error term keeps them at inference. Contexts are packed from documents joined by
`<|endoftext|>` (else the tokenizer's eos, else bos), without a leading BOS.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from fsrl.errors import FsrlError

log = logging.getLogger(__name__)

SEPARATOR_TOKEN = "<|endoftext|>"
QUALITY_FILE = "quality.json"
QUALITY_FORMAT = "fsrl-sae-quality/1"


@dataclass
class SaeTrainConfig:
    text: str
    layer: int
    out: str
    model: str | None = None
    d_sae: int = 4608
    architecture: str = "topk"
    k: int = 64
    aux_k_coefficient: float = 1.0
    sparsity_coefficient: float | None = None
    lr: float = 5e-4
    lr_decay_fraction: float = 0.2
    batch_size: int = 1024
    training_tokens: int = 2_000_000
    unique_tokens: int = 0
    context_size: int = 128
    store_batch_size: int = 32
    dead_feature_window: int = 100
    device: str = "auto"
    seed: int = 0
    dtype: str = "float16"
    eval_tokens: int = 32_768
    ce_tokens: int = 4_096
    eval_fraction: float = 0.05
    name: str | None = None
    activation_cache: str | None = None
    max_norm_ratio: float = 10.0


# ---------------------------------------------------------------------------------------------
# CLI


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


# ---------------------------------------------------------------------------------------------
# Architectures: name -> sae-lens training config (resolved once)


def _topk(cfg: SaeTrainConfig, d_in: int, device: str):
    from sae_lens import TopKTrainingSAEConfig

    return TopKTrainingSAEConfig(d_in=d_in, d_sae=cfg.d_sae, k=cfg.k, device=device,
                                 aux_loss_coefficient=cfg.aux_k_coefficient)


def _batchtopk(cfg: SaeTrainConfig, d_in: int, device: str):
    from sae_lens import BatchTopKTrainingSAEConfig

    return BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=cfg.d_sae, k=cfg.k, device=device,
                                      aux_loss_coefficient=cfg.aux_k_coefficient)


def _standard(cfg: SaeTrainConfig, d_in: int, device: str):
    from sae_lens import StandardTrainingSAEConfig

    extra = {} if cfg.sparsity_coefficient is None else {"l1_coefficient": cfg.sparsity_coefficient}
    return StandardTrainingSAEConfig(d_in=d_in, d_sae=cfg.d_sae, device=device, **extra)


def _jumprelu(cfg: SaeTrainConfig, d_in: int, device: str):
    from sae_lens import JumpReLUTrainingSAEConfig

    extra = {} if cfg.sparsity_coefficient is None else {"l0_coefficient": cfg.sparsity_coefficient}
    return JumpReLUTrainingSAEConfig(d_in=d_in, d_sae=cfg.d_sae, device=device, **extra)


# Each saves in an inference architecture fsrl.sae reads (batchtopk saves as jumprelu).
ARCHITECTURES = {"topk": _topk, "batchtopk": _batchtopk, "standard": _standard,
                 "jumprelu": _jumprelu}


# ---------------------------------------------------------------------------------------------
# Training


def _check(cfg: SaeTrainConfig) -> None:
    if cfg.architecture not in ARCHITECTURES:
        raise FsrlError(f"unknown architecture {cfg.architecture!r}; "
                        f"choose from {', '.join(sorted(ARCHITECTURES))}")
    for name in ("d_sae", "batch_size", "training_tokens", "context_size", "store_batch_size",
                 "eval_tokens", "dead_feature_window"):
        if getattr(cfg, name) <= 0:
            raise FsrlError(f"--{name.replace('_', '-')} must be positive")
    if cfg.architecture in ("topk", "batchtopk") and not 0 < cfg.k <= cfg.d_sae:
        raise FsrlError(f"--k must be in 1..{cfg.d_sae}")
    if cfg.context_size < 2:
        raise FsrlError("--context-size must be at least 2 (position 0 is left out)")
    if cfg.max_norm_ratio < 0 or 0 < cfg.max_norm_ratio <= 1:
        raise FsrlError("--max-norm-ratio must be 0 (off) or above 1")
    if not 0 < cfg.eval_fraction < 1:
        raise FsrlError("--eval-fraction must be between 0 and 1")
    if cfg.training_tokens < cfg.batch_size:
        raise FsrlError("--training-tokens must be at least --batch-size")


def train_sae(cfg: SaeTrainConfig) -> dict:
    """Train, save and evaluate; returns the quality record written to OUT/quality.json."""
    _check(cfg)
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
    rows = corpus.load_rows(cfg.text, seed=cfg.seed)
    if len(rows) < 2:
        raise FsrlError(f"corpus {cfg.text!r} is too small: it needs at least two paragraphs")
    n_held = max(1, round(len(rows) * cfg.eval_fraction))
    held_rows, train_rows = rows[:n_held], rows[n_held:]
    log.info("corpus %s: %d chunks (%d held out for evaluation)", cfg.text, len(rows), n_held)

    device = resolve_device(cfg.device)
    base = load_base_model(cfg.model, device=device)
    n_layers = len(base.layers)
    if not 0 <= cfg.layer < n_layers:
        raise FsrlError(f"--layer {cfg.layer} is out of range: {base.name} has {n_layers} "
                        f"layers (0..{n_layers - 1})")
    hook_name = f"model.layers.{cfg.layer}"
    separator = separator_token_id(base.tokenizer)
    excl = Exclusions(token_ids=sorted(set(getattr(base.tokenizer, "all_special_ids", []) or [])
                                       | ({separator} if separator is not None else set())))

    with tempfile.TemporaryDirectory(prefix="fsrl-sae-") as tmp:
        t_train = time.time()
        trained_dir, tokens_trained = _run_sae_lens(cfg, base, hook_name, separator, excl,
                                                    train_rows, Path(tmp), str(device))
        t_train = time.time() - t_train
        sae_name = cfg.name or (f"{base.name}-L{cfg.layer}-{cfg.architecture}"
                                f"{cfg.k if 'topk' in cfg.architecture else ''}-{cfg.d_sae}")
        _write_output(trained_dir, out, cfg, sae_name, base, excl)

    from fsrl.sae import load_sae

    sae = load_sae(out, device=device)
    t_eval = time.time()
    tokens = pack_contexts(base.tokenizer, held_rows, cfg.context_size, separator,
                           cfg.eval_tokens)
    figures = evaluate_sae(base, sae, cfg.layer, tokens, excl, ce_tokens=cfg.ce_tokens)
    figures["sae_lens_parity_max_abs_diff"] = sae_lens_parity(out, sae, base, cfg.layer,
                                                              tokens[:4], excl)
    quality = {
        "format": QUALITY_FORMAT,
        "sae": sae_name, "model": base.name, "model_fingerprint": base.fingerprint,
        "sae_fingerprint": sae.info.fingerprint, "hook_name": hook_name, "layer": cfg.layer,
        "architecture": cfg.architecture, "d_in": base.d_model, "d_sae": cfg.d_sae,
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
        "sae_lens_version": _sae_lens_version(),
    }
    (out / QUALITY_FILE).write_text(json.dumps(quality, indent=2) + "\n")
    return quality


def rebuild_command(cfg: SaeTrainConfig) -> str:
    """The `fsrl sae train` command line that rebuilds this SAE (options left at their
    defaults are omitted)."""
    defaults = SaeTrainConfig(text="", layer=0, out="")
    parts = ["fsrl", "sae", "train", "--text", cfg.text, "--layer", str(cfg.layer),
             "--out", cfg.out]
    for key, value in asdict(cfg).items():
        if key in ("text", "layer", "out", "activation_cache") or value == getattr(defaults, key):
            continue
        parts += [f"--{key.replace('_', '-')}", str(value)]
    return " ".join(parts)


def _sae_lens_version() -> str:
    from importlib.metadata import version

    return version("sae-lens")


@dataclass
class Exclusions:
    """Positions left out of SAE training and evaluation: position 0, special token ids, and
    activations whose norm exceeds `norm_threshold` (None: no norm rule)."""

    token_ids: list[int]
    norm_threshold: float | None = None

    def keep(self, tokens, x=None):
        """(B, T) tokens [and (B, T, d_in) activations] -> (B, T) bool: positions that count."""
        import torch

        keep = ~torch.isin(tokens, torch.tensor(self.token_ids, dtype=tokens.dtype))
        keep[:, 0] = False
        if x is not None and self.norm_threshold is not None:
            keep &= (x.float().norm(dim=-1) <= self.norm_threshold).to(keep.device)
        return keep

    def drop_outliers(self, acts):
        """(N, d_in) activations already filtered by position and token -> norm rule applied."""
        if self.norm_threshold is None:
            return acts
        return acts[acts.norm(dim=-1) <= self.norm_threshold]

    def to_json(self) -> dict:
        return {"positions": [0], "token_ids": self.token_ids,
                "activation_norm_above": self.norm_threshold}


def separator_token_id(tokenizer) -> int | None:
    """Document separator: `<|endoftext|>` if the vocabulary has it, else eos, else bos."""
    vocab = tokenizer.get_vocab()
    if SEPARATOR_TOKEN in vocab:
        return int(vocab[SEPARATOR_TOKEN])
    for attr in ("eos_token_id", "bos_token_id"):
        if getattr(tokenizer, attr, None) is not None:
            return int(getattr(tokenizer, attr))
    return None


@contextmanager
def _quiet_sae_lens():
    """sae-lens warns at length when handed a dataset object and untokenised text; both are
    what we mean to do."""
    sae_lens_log = logging.getLogger("sae_lens")
    level = sae_lens_log.level
    sae_lens_log.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        for msg in ("Dataset is not tokenized", "The training dataset contains fewer samples",
                    "All samples in the training dataset have been exhausted"):
            warnings.filterwarnings("ignore", message=msg)
        try:
            yield
        finally:
            sae_lens_log.setLevel(level)


def _runner_config(cfg: SaeTrainConfig, base, hook_name: str, separator: int | None,
                   excl: Exclusions, device: str, output_path: Path, cache_path: Path | None):
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig

    steps = math.ceil(cfg.training_tokens / cfg.batch_size)
    return LanguageModelSAERunnerConfig(
        sae=ARCHITECTURES[cfg.architecture](cfg, base.d_model, device),
        model_name=base.name, model_class_name="AutoModelForCausalLM", hook_name=hook_name,
        dataset_path="", streaming=False, is_dataset_tokenized=False,
        context_size=cfg.context_size, prepend_bos=False, seqpos_slice=(1, None),
        exclude_special_tokens=excl.token_ids, sequence_separator_token=separator,
        use_cached_activations=cache_path is not None,
        cached_activations_path=str(cache_path) if cache_path is not None else None,
        training_tokens=cfg.training_tokens, train_batch_size_tokens=cfg.batch_size,
        store_batch_size_prompts=cfg.store_batch_size,
        # sae-lens sizes its mixing buffer as n_batches_in_buffer * (context_size - 1) tokens
        # and needs it to hold a training batch
        n_batches_in_buffer=max(20, math.ceil(2 * cfg.batch_size / (cfg.context_size - 1))),
        lr=cfg.lr, lr_scheduler_name="constant", lr_decay_steps=int(steps * cfg.lr_decay_fraction),
        dead_feature_window=cfg.dead_feature_window, feature_sampling_window=max(steps, 1),
        device=device, act_store_device="cpu" if cache_path is not None else device,
        seed=cfg.seed, dtype="float32", autocast_lm=False,
        logger=LoggingConfig(log_to_wandb=False), n_checkpoints=0, checkpoint_path=None,
        output_path=str(output_path), verbose=False,
    )


def _cache_key(cfg: SaeTrainConfig, base, hook_name: str) -> dict:
    """What an activation cache depends on; a cache is reused only when all of it matches."""
    return {"model_fingerprint": base.fingerprint, "hook_name": hook_name, "text": cfg.text,
            "seed": cfg.seed, "eval_fraction": cfg.eval_fraction,
            "context_size": cfg.context_size, "unique_tokens": cfg.unique_tokens,
            "max_norm_ratio": cfg.max_norm_ratio}


def _run_sae_lens(cfg: SaeTrainConfig, base, hook_name: str, separator: int | None,
                  excl: Exclusions, train_rows: list[str], tmp: Path,
                  device: str) -> tuple[Path, int]:
    """Train with sae-lens's runner; returns the folder it saved and the tokens trained on.
    Sets `excl.norm_threshold` from the first batch of activations."""
    import datasets
    import torch
    from sae_lens import LanguageModelSAETrainingRunner
    from sae_lens.load_model import HookedProxyLM
    from sae_lens.training.activations_store import ActivationsStore

    train_ds = datasets.Dataset.from_dict({"text": train_rows})
    proxy = HookedProxyLM(base.model, base.tokenizer, hook_names=[hook_name])
    trained_dir = tmp / "trained"
    cache_path = None
    key = _cache_key(cfg, base, hook_name)
    cache_path = None
    with _quiet_sae_lens():
        stream_cfg = _runner_config(cfg, base, hook_name, separator, excl, device,
                                    trained_dir, None)
        store = ActivationsStore.from_config(proxy, stream_cfg, override_dataset=train_ds)
        cached = None
        if 0 < cfg.unique_tokens < cfg.training_tokens:
            cache_path = Path(cfg.activation_cache or tmp / "activations").expanduser()
            cached = read_cache_manifest(cache_path, key)
        if cached is not None:
            log.info("reusing the activation cache in %s", cache_path)
            excl.norm_threshold = cached["norm_threshold"]
            b_dec = torch.tensor(cached["mean"])  # (d_in,)
        else:
            sample = store.get_filtered_llm_batch()  # (n, d_in), position and token rules applied
            if cfg.max_norm_ratio:
                excl.norm_threshold = float(sample.norm(dim=-1).median()) * cfg.max_norm_ratio
            b_dec = excl.drop_outliers(sample).mean(0)  # (d_in,)
        _drop_outliers_in(store, excl)
        if cache_path is not None and cached is None:
            acts = collect_activations(store, cfg.unique_tokens, seed=cfg.seed)
            b_dec = acts.mean(0)
            write_activation_cache(acts, cache_path, hook_name, cfg.context_size,
                                   {"key": key, "mean": b_dec.tolist(),
                                    "norm_threshold": excl.norm_threshold})
            del acts
        del store
        run_cfg = _runner_config(cfg, base, hook_name, separator, excl, device,
                                 trained_dir, cache_path)
        runner = LanguageModelSAETrainingRunner(run_cfg, override_dataset=train_ds,
                                                override_model=proxy)
        # sae-lens filters by position and token id only; add the norm rule to its stream
        _drop_outliers_in(runner.activations_store, excl)
        # Start the decoder bias at the data mean (the TopK paper, Gao et al. 2024, uses the
        # geometric median); sae-lens starts it at zero, which at a residual layer with a large
        # mean offset wastes early steps.
        with torch.no_grad():
            runner.sae.b_dec.copy_(b_dec.to(runner.sae.b_dec))
        runner.run()
    _remove_proxy_hooks(base.model)
    steps = math.ceil(cfg.training_tokens / cfg.batch_size)
    return trained_dir, steps * cfg.batch_size


def _drop_outliers_in(store, excl: Exclusions) -> None:
    """Make an ActivationsStore apply the norm rule after its own position/token filter."""
    if excl.norm_threshold is None:
        return
    filtered = store.get_filtered_llm_batch

    def get_filtered_llm_batch(*args, **kwargs):
        return excl.drop_outliers(filtered(*args, **kwargs))

    store.get_filtered_llm_batch = get_filtered_llm_batch


def _remove_proxy_hooks(model) -> None:
    """HookedProxyLM leaves forward hooks on the model's modules; drop them."""
    for module in model.modules():
        for key, fn in list(module._forward_hooks.items()):
            if getattr(fn, "__qualname__", "").startswith("get_hook_fn"):
                del module._forward_hooks[key]


def collect_activations(store, n_tokens: int, seed: int = 0):
    """n_tokens activations (n_tokens, d_in) from an ActivationsStore, excluded positions
    already filtered out, shuffled."""
    import torch
    from tqdm.auto import tqdm

    chunks, have = [], 0
    with tqdm(total=n_tokens, desc="Collecting activations", unit="tok") as pbar:
        while have < n_tokens:
            batch = store.get_filtered_llm_batch().to("cpu", torch.float32)  # (n, d_in)
            batch = batch[: n_tokens - have]
            chunks.append(batch)
            have += batch.shape[0]
            pbar.update(batch.shape[0])
    acts = torch.cat(chunks)
    return acts[torch.randperm(acts.shape[0], generator=torch.Generator().manual_seed(seed))]


CACHE_MANIFEST = "fsrl-activations.json"


def read_cache_manifest(path: Path, key: dict) -> dict | None:
    """The manifest (key, mean, norm_threshold) of a matching cache in `path`, else None."""
    manifest = path / CACHE_MANIFEST
    if not manifest.exists():
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise FsrlError(f"activation cache folder {path} is not empty and holds no cache; "
                            "name an empty or new folder")
        return None
    meta = json.loads(manifest.read_text())
    if meta.get("key") != key:
        log.info("activation cache in %s was made for other settings; collecting anew", path)
        return None
    return meta


def write_activation_cache(acts, path: Path, hook_name: str, context_size: int,
                           manifest: dict | None = None) -> Path:
    """Write activations as a sae-lens activation cache: a `datasets` folder with one column
    named after the hook, rows of (context_size, d_in). Rows here are bags of already-filtered
    tokens, not contexts: SAE training ignores token order."""
    import datasets

    n_rows = acts.shape[0] // context_size
    if n_rows == 0:
        raise FsrlError(f"--unique-tokens must be at least --context-size ({context_size})")
    d_in = acts.shape[1]
    array = acts[: n_rows * context_size].reshape(n_rows, context_size, d_in).numpy()
    features = datasets.Features({hook_name: datasets.Array2D((context_size, d_in), "float32")})
    ds = datasets.Dataset.from_dict({hook_name: array}, features=features)
    if path.exists() and any(path.iterdir()):
        if not (path / CACHE_MANIFEST).exists():
            raise FsrlError(f"activation cache folder {path} is not empty and holds no cache; "
                            "name an empty or new folder")
        shutil.rmtree(path)  # a stale cache of ours
    ds.save_to_disk(str(path))
    if manifest is not None:
        (path / CACHE_MANIFEST).write_text(json.dumps(manifest))
    return path


def _write_output(trained_dir: Path, out: Path, cfg: SaeTrainConfig, sae_name: str, base,
                  excl: Exclusions) -> None:
    """Copy sae-lens's inference folder into OUT in the chosen dtype, with our metadata."""
    import torch
    from safetensors.torch import load_file, save_file

    from fsrl.sae import SAE_CFG_FILE, SAE_WEIGHTS_FILE

    dtype = getattr(torch, cfg.dtype)
    out.mkdir(parents=True, exist_ok=True)
    weights = load_file(trained_dir / SAE_WEIGHTS_FILE)
    save_file({k: v.to(dtype).contiguous() for k, v in weights.items()}, out / SAE_WEIGHTS_FILE)
    (out / SAE_WEIGHTS_FILE).chmod(0o644)  # safetensors writes 0600; this folder may be shipped
    sae_cfg = json.loads((trained_dir / SAE_CFG_FILE).read_text())
    sae_cfg["dtype"] = cfg.dtype
    sae_cfg["device"] = "cpu"
    meta = sae_cfg.setdefault("metadata", {})
    meta.update({"sae_name": sae_name, "model_name": base.name,
                 "fsrl_model_fingerprint": base.fingerprint,
                 "hook_name": f"model.layers.{cfg.layer}", "dataset_path": cfg.text,
                 "excluded_token_ids": excl.token_ids,
                 "excluded_activation_norm_above": excl.norm_threshold})
    (out / SAE_CFG_FILE).write_text(json.dumps(sae_cfg, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Evaluation, with our own SAE reader


def pack_contexts(tokenizer, rows: list[str], context_size: int, separator: int | None,
                  max_tokens: int):
    """Held-out rows -> (n, context_size) token ids, packed like training: documents joined by
    the separator, no BOS, cut into contexts."""
    import torch

    ids: list[int] = []
    need = max(context_size, (max_tokens // context_size) * context_size)
    for row in rows:
        ids.extend(tokenizer(row, add_special_tokens=False)["input_ids"])
        if separator is not None:
            ids.append(separator)
        if len(ids) >= need:
            break
    n = min(len(ids), need) // context_size
    if n == 0:
        raise FsrlError(f"held-out text is shorter than one context ({context_size} tokens); "
                        "use a bigger corpus or a larger --eval-fraction")
    return torch.tensor(ids[: n * context_size]).view(n, context_size)


def layer_activations(base, layer: int, tokens):
    """Residual stream after decoder layer `layer` for (B, T) tokens -> (B, T, d_in) float32."""
    return base.layer_output(layer, tokens).float()


def _ce_loss(base, layer: int, tokens, keep, edit) -> tuple[float, int]:
    """Summed next-token CE over positions t with keep[t] and keep[t+1] (an ordinary target),
    with `edit(x, keep)` applied to the hook layer's output."""
    import torch
    import torch.nn.functional as F

    def hook(module, inputs, output):
        x = output[0] if isinstance(output, tuple) else output
        x = edit(x, keep.to(x.device))
        return (x, *output[1:]) if isinstance(output, tuple) else x

    handle = base.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = base.model(tokens.to(base.device)).logits.float()  # (B, T, V)
    finally:
        handle.remove()
    # position t predicts token t+1
    mask = (keep[:, :-1] & keep[:, 1:]).to(logits.device)  # (B, T-1)
    targets = tokens[:, 1:].flatten().to(logits.device)
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets,
                             reduction="none").view(mask.shape)  # (B, T-1)
    return float(losses[mask].sum()), int(mask.sum())


def evaluate_sae(base, sae, layer: int, tokens, excl: Exclusions, ce_tokens: int = 4096,
                 batch_size: int = 32, ce_batch_size: int = 8) -> dict:
    """Held-out quality figures for `sae` at `layer`: explained variance, mean L0, dead share,
    CE loss clean / spliced / zero-ablated and CE loss recovered."""
    import torch
    from tqdm.auto import tqdm

    d_in = sae.d_in
    sq_err = torch.zeros((), dtype=torch.float64)
    sum_x = torch.zeros(d_in, dtype=torch.float64)
    sum_sq = torch.zeros((), dtype=torch.float64)
    n_tok, n_seen, l0_sum = 0, 0, 0.0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    for i in tqdm(range(0, tokens.shape[0], batch_size), desc="Evaluating SAE", unit="batch"):
        batch = tokens[i: i + batch_size]
        acts = layer_activations(base, layer, batch)  # (B, T, d_in)
        keep = excl.keep(batch, acts)
        n_seen += keep.numel()
        x = acts[keep.to(acts.device)].to(sae.W_enc.device)  # (N, d_in)
        with torch.no_grad():
            f = sae.encode(x)  # (N, d_sae)
            x_hat = sae.decode(f)  # (N, d_in)
        sq_err += (x - x_hat).double().pow(2).sum().cpu()
        sum_x += x.double().sum(0).cpu()
        sum_sq += x.double().pow(2).sum().cpu()
        n_tok += x.shape[0]
        active = f > 0
        l0_sum += float(active.sum())
        fired |= active.any(0).cpu()
    total_var = sum_sq - sum_x.pow(2).sum() / n_tok

    def clean(x, keep):
        return x

    def splice(x, keep):
        x = x.clone()
        x[keep] = sae.decode(sae.encode(x[keep])).to(x.dtype)
        return x

    def zero(x, keep):
        x = x.clone()
        x[keep] = 0
        return x

    n_ce = max(1, min(tokens.shape[0], ce_tokens // tokens.shape[1]))
    ce = {"clean": [0.0, 0], "spliced": [0.0, 0], "zero_ablation": [0.0, 0]}
    for i in tqdm(range(0, n_ce, ce_batch_size), desc="CE loss (clean/spliced/zero)",
                  unit="batch"):
        batch = tokens[i: min(i + ce_batch_size, n_ce)]
        keep = excl.keep(batch, layer_activations(base, layer, batch))
        for name, edit in (("clean", clean), ("spliced", splice), ("zero_ablation", zero)):
            loss, count = _ce_loss(base, layer, batch, keep, edit)
            ce[name][0] += loss
            ce[name][1] += count
    ce_clean, ce_spliced, ce_zero = (ce[k][0] / max(ce[k][1], 1)
                                     for k in ("clean", "spliced", "zero_ablation"))
    denom = ce_zero - ce_clean
    return {
        "explained_variance": round(float(1 - sq_err / total_var), 4),
        "mse_per_token": round(float(sq_err / n_tok), 4),
        "l0_mean": round(l0_sum / n_tok, 2),
        "dead_feature_share": round(1 - float(fired.float().mean()), 4),
        "dead_features": int((~fired).sum()),
        "eval_tokens": n_tok,
        "eval_positions_excluded_share": round(1 - n_tok / n_seen, 4),
        "ce_loss_clean": round(ce_clean, 4),
        "ce_loss_spliced": round(ce_spliced, 4),
        "ce_loss_zero_ablation": round(ce_zero, 4),
        "ce_loss_recovered": round((ce_zero - ce_spliced) / denom, 4) if denom > 0 else None,
        "ce_eval_tokens": ce["clean"][1],
    }


def sae_lens_parity(path: Path, sae, base, layer: int, tokens, excl: Exclusions) -> float:
    """Largest |difference| between our reader's and sae-lens's encode+decode on real
    activations (both in float32)."""
    import torch
    from sae_lens import SAE

    theirs = SAE.load_from_disk(str(path), device=str(sae.W_enc.device), dtype="float32")
    acts = layer_activations(base, layer, tokens)  # (B, T, d_in)
    x = acts[excl.keep(tokens, acts).to(acts.device)].to(sae.W_enc.device)
    with torch.no_grad():
        f_ours, f_theirs = sae.encode(x), theirs.encode(x)
        diff = max(float((f_ours - f_theirs).abs().max()),
                   float((sae.decode(f_ours) - theirs.decode(f_theirs)).abs().max()))
    return float(f"{diff:.3g}")


def format_summary(q: dict) -> str:
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
