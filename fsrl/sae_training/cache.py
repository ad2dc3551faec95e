"""Activation caches on disk: activations collected once and trained over for several epochs,
in sae-lens's cached-activations layout, with a manifest saying what they were made from."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from fsrl.errors import FsrlError
from fsrl.sae_training.config import SaeTrainConfig

log = logging.getLogger(__name__)

CACHE_MANIFEST = "fsrl-activations.json"


def cache_key(cfg: SaeTrainConfig, base, hook_name: str) -> dict:
    """What an activation cache depends on; a cache is reused only when all of it matches."""
    return {"model_fingerprint": base.fingerprint, "hook_name": hook_name, "text": cfg.text,
            "seed": cfg.seed, "eval_fraction": cfg.eval_fraction,
            "context_size": cfg.context_size, "unique_tokens": cfg.unique_tokens,
            "max_norm_ratio": cfg.max_norm_ratio}


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

