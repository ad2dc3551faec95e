"""sae-lens glue: its training runner on our model and corpus, and the patches it needs (the
norm rule in its activation store, the hooks its model wrapper leaves behind, its warnings)."""

from __future__ import annotations

import logging
import math
import warnings
from contextlib import contextmanager
from pathlib import Path

from fsrl.sae_training.cache import (cache_key, collect_activations, read_cache_manifest,
                                     write_activation_cache)
from fsrl.sae_training.config import Architecture, SaeTrainConfig
from fsrl.sae_training.exclusions import Exclusions

log = logging.getLogger(__name__)


def run_sae_lens(cfg: SaeTrainConfig, arch: Architecture, base, hook_name: str,
                 separator: int | None, excl: Exclusions, train_rows: list[str], tmp: Path,
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
    key = cache_key(cfg, base, hook_name)
    with _quiet_sae_lens():
        stream_cfg = _runner_config(cfg, arch, base, hook_name, separator, excl, device,
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
        run_cfg = _runner_config(cfg, arch, base, hook_name, separator, excl, device,
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


def _runner_config(cfg: SaeTrainConfig, arch: Architecture, base, hook_name: str,
                   separator: int | None, excl: Exclusions, device: str, output_path: Path,
                   cache_path: Path | None):
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig

    steps = math.ceil(cfg.training_tokens / cfg.batch_size)
    return LanguageModelSAERunnerConfig(
        sae=arch.training_config(cfg, base.d_model, device),
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


def sae_lens_version() -> str:
    """The installed sae-lens's version (recorded in quality.json)."""
    from importlib.metadata import version

    return version("sae-lens")
