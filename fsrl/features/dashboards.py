"""Feature dashboards, built offline from a corpus, stored beside the SAE.

For every feature of an SAE at one layer, from the model's activations on a corpus:

    density          share of corpus tokens on which the feature is active (f > 0)
    histogram        counts of its positive activations in bins: (0, 0.01], then four a decade
                     up to 10,000 (HIST_EDGES), then above
    top_contexts     the top-k activating token windows, the peak token marked
    promoted         output tokens its decoder direction raises most, through the final norm's
    suppressed       scale and the unembedding (logit lens): W_dec[i] * norm.weight @ W_U^T

The corpus is read as a stream of contexts (each document cut into windows of
`context_size` tokens) and everything kept per feature has a fixed size, so the statistics
do not grow with the corpus (the documents themselves come from the caller's iterator). Every `checkpoint_every` contexts the state is saved; a run started
again with the same settings goes on from there. Stored as gzipped JSON (`DASHBOARDS_FILE`),
tokens as text.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fsrl.errors import CorruptFileError, FsrlError
from fsrl.models import BaseModel
from fsrl.sae import Sae

log = logging.getLogger(__name__)

DASHBOARDS_FILE = "feature_dashboards.json.gz"
PARTIAL_FILE = "feature_dashboards.partial.pt"
DASHBOARDS_FORMAT = "fsrl-feature-dashboards/1"
HIST_EDGES = [10 ** (e / 4) for e in range(-8, 17)]  # 0.01 .. 10,000, four bins a decade
WINDOW_BEFORE, WINDOW_AFTER = 12, 4


@dataclass
class BuildSettings:
    context_size: int = 128
    batch_size: int = 16
    top_k: int = 12                     # contexts kept per feature; the file shows `shown`
    shown: int = 8                      # distinct ones (a repeated text counts once)
    max_tokens: int | None = None       # stop after this many corpus tokens
    checkpoint_every: int = 512         # contexts between saved states
    exclude_norm_above: float | None = None  # activations this large (outlier positions) are left out

    def key(self, corpus: str, sae: Sae) -> dict[str, Any]:
        """What a saved state must match to be resumed."""
        return {"corpus": corpus, "sae": sae.info.fingerprint, "context_size": self.context_size,
                "top_k": self.top_k, "max_tokens": self.max_tokens}


class Accumulator:
    """Per-feature statistics over a stream of (features, token ids) batches; fixed size."""

    def __init__(self, d_sae: int, top_k: int, window: int = WINDOW_BEFORE + 1 + WINDOW_AFTER):
        self.tokens = 0
        self.contexts = 0
        self.active = torch.zeros(d_sae, dtype=torch.long)
        self.hist = torch.zeros(d_sae, len(HIST_EDGES) + 1, dtype=torch.long)
        self.top_values = torch.full((d_sae, top_k), -math.inf)
        self.top_windows = torch.full((d_sae, top_k, window), -1, dtype=torch.long)
        self._edges = torch.tensor(HIST_EDGES)

    @torch.no_grad()
    def update(self, f: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> None:
        """f (B, T, d_sae) features, ids (B, T) tokens (-1 where there is none), valid (B, T)
        the positions that count."""
        ids, valid = ids.cpu(), valid.cpu()
        f = torch.where(valid[..., None], f.float().cpu(), 0.0)
        B, T, d_sae = f.shape
        flat = f.reshape(B * T, d_sae)
        self.tokens += int(valid.sum())
        self.contexts += B
        where = flat.nonzero()                                                 # (M, 2) active entries
        self.active += torch.bincount(where[:, 1], minlength=d_sae)
        bins = torch.bucketize(flat[where[:, 0], where[:, 1]], self._edges)
        self.hist.view(-1).index_add_(0, where[:, 1] * self.hist.shape[1] + bins,
                                      torch.ones_like(bins))
        k = self.top_values.shape[1]
        # One candidate per context (its peak), so that a context fills one place, not several.
        peak_values, peak_at = f.max(dim=1)                                    # (B, d_sae)
        values, rows = peak_values.topk(min(k, B), dim=0)                      # (k, d_sae)
        positions = (rows * T + peak_at.gather(0, rows)).T                     # (d_sae, k) flat
        values = torch.where(values > 0, values, -math.inf).T                  # (d_sae, k)
        padded = torch.cat([torch.full((B, WINDOW_BEFORE), -1), ids,
                            torch.full((B, WINDOW_AFTER), -1)], dim=1)          # (B, T + W - 1)
        width = padded.shape[1]
        # The window starting WINDOW_BEFORE tokens ahead of each peak, from the flat padded ids.
        start = (positions // T) * width + positions % T                       # (d_sae, k)
        windows = padded.reshape(-1)[start[..., None] + torch.arange(self.top_windows.shape[2])]
        all_values = torch.cat([self.top_values, values], dim=1)
        keep = all_values.topk(k, dim=1).indices
        self.top_values = all_values.gather(1, keep)
        all_windows = torch.cat([self.top_windows, windows], dim=1)
        self.top_windows = all_windows.gather(1, keep[..., None].expand(-1, -1, all_windows.shape[2]))

    def state(self) -> dict[str, torch.Tensor]:
        return {"tokens": torch.tensor(self.tokens), "contexts": torch.tensor(self.contexts),
                "active": self.active, "hist": self.hist, "top_values": self.top_values,
                "top_windows": self.top_windows}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.tokens, self.contexts = int(state["tokens"]), int(state["contexts"])
        for name in ("active", "hist", "top_values", "top_windows"):
            if getattr(self, name).shape != state[name].shape:
                raise FsrlError(f"the saved dashboard state does not match ({name})")
            setattr(self, name, state[name])


@torch.no_grad()
def logit_lens(base: BaseModel, sae: Sae, top: int = 8, chunk: int = 256
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each feature's most promoted and suppressed output tokens: (values, ids) for the top
    and for the bottom, each (d_sae, top)."""
    unembed = base.model.get_output_embeddings().weight                       # (V, d_model)
    norm = getattr(getattr(base.model, "model", base.model), "norm", None)
    scale = getattr(norm, "weight", None)
    hi_v, hi_i, lo_v, lo_i = [], [], [], []
    for start in range(0, sae.d_sae, chunk):
        direction = sae.W_dec[start:start + chunk].to(unembed.dtype)
        if scale is not None:
            direction = direction * scale
        logits = (direction @ unembed.T).float()                              # (chunk, V)
        hi = logits.topk(top, dim=-1)
        lo = logits.topk(top, dim=-1, largest=False)
        hi_v.append(hi.values.cpu()), hi_i.append(hi.indices.cpu())
        lo_v.append(lo.values.cpu()), lo_i.append(lo.indices.cpu())
    return torch.cat(hi_v), torch.cat(hi_i), torch.cat(lo_v), torch.cat(lo_i)


def iter_contexts(tokenizer, documents: Iterable[str], context_size: int) -> Iterator[list[int]]:
    """Each document's tokens in windows of `context_size` (the last one shorter)."""
    for doc in documents:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), context_size):
            window = ids[start:start + context_size]
            if len(window) >= 2:
                yield window


@torch.no_grad()
def _batch_features(base: BaseModel, sae: Sae, layer: int, batch: list[list[int]], pad_id: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SAE features at the hook layer for a batch of contexts (right-padded), the ids, the mask
    of real positions and the residual itself; the model runs only up to the hook layer."""
    width = max(len(c) for c in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.bool)
    for b, context in enumerate(batch):
        ids[b, :len(context)] = torch.tensor(context)
        mask[b, :len(context)] = True
    x = base.activations(sae.site_at(layer), ids, mask.long())
    return sae.encode(x), ids, mask, x


def build(base: BaseModel, sae: Sae, layer: int, documents: Iterable[str], corpus: str,
          out_dir: Path, settings: BuildSettings, token_text: list[str], resume: bool = True,
          progress: bool = True) -> Path:
    """Stream the corpus through the model to the hook layer, accumulate every feature's
    statistics, then write `out_dir/DASHBOARDS_FILE`. Position 0 of every context, special
    tokens and (with `exclude_norm_above`) outlier activations are left out, as in SAE training."""
    from tqdm.auto import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    acc = Accumulator(sae.d_sae, settings.top_k)
    key = settings.key(corpus, sae)
    partial = out_dir / PARTIAL_FILE
    if resume and partial.exists():
        saved = torch.load(partial, map_location="cpu", weights_only=True)
        if json.loads(saved["key"]) == key:
            acc.load(saved["state"])
            log.info("resuming the dashboards after %d contexts (%d tokens)", acc.contexts, acc.tokens)
        else:
            log.info("a saved dashboard state for other settings is ignored")
    special = set(getattr(base.tokenizer, "all_special_ids", []) or [])
    pad_id = base.tokenizer.pad_token_id or 0
    skip, done_contexts = acc.contexts, 0
    bar = tqdm(total=settings.max_tokens, unit="tok", disable=not progress, desc="dashboards",
               initial=acc.tokens)
    batch: list[list[int]] = []
    since_checkpoint = 0

    def run(contexts: list[list[int]]) -> None:
        f, ids, mask, x = _batch_features(base, sae, layer, contexts, pad_id)
        valid = mask.clone()
        valid[:, 0] = False  # position 0 carries an outlier norm; SAEs train without it
        if special:
            valid &= ~torch.isin(ids, torch.tensor(sorted(special)))
        if settings.exclude_norm_above is not None:
            valid &= (x.float().norm(dim=-1) <= settings.exclude_norm_above).cpu()
        acc.update(f, ids.masked_fill(~mask, -1), valid)  # -1: no token (windows show none)
        bar.update(int(valid.sum()))

    for context in iter_contexts(base.tokenizer, documents, settings.context_size):
        if done_contexts < skip:  # already counted before a restart
            done_contexts += 1
            continue
        if settings.max_tokens is not None and acc.tokens >= settings.max_tokens:
            break
        batch.append(context)
        done_contexts += 1
        if len(batch) == settings.batch_size:
            run(batch)
            batch, since_checkpoint = [], since_checkpoint + settings.batch_size
            if since_checkpoint >= settings.checkpoint_every:
                torch.save({"key": json.dumps(key), "state": acc.state()}, partial)
                since_checkpoint = 0
    if batch:
        run(batch)
    bar.close()
    if acc.tokens == 0:
        raise FsrlError(f"corpus {corpus!r} gave no tokens to measure features on")
    lens = logit_lens(base, sae)
    path = write(out_dir, acc, lens, sae, base.name, corpus, token_text, settings.shown)
    partial.unlink(missing_ok=True)
    return path


def write(out_dir: Path, acc: Accumulator, lens, sae: Sae, model_name: str, corpus: str,
          token_text: list[str], shown: int | None = None) -> Path:
    """The dashboards file; each feature shows its `shown` best distinct contexts (default:
    all it kept)."""
    hi_v, hi_i, lo_v, lo_i = lens
    text = (lambda i: token_text[i] if 0 <= i < len(token_text) else "")
    features = []
    for i in range(sae.d_sae):
        entry: dict[str, Any] = {"index": i, "density": round(int(acc.active[i]) / acc.tokens, 7)}
        entry["promoted"] = [[text(t), round(v, 4)] for t, v in zip(hi_i[i].tolist(), hi_v[i].tolist())]
        entry["suppressed"] = [[text(t), round(v, 4)] for t, v in zip(lo_i[i].tolist(), lo_v[i].tolist())]
        if acc.active[i] > 0:
            entry["max_activation"] = round(float(acc.top_values[i, 0]), 4)
            entry["histogram"] = acc.hist[i].tolist()  # counts[j]: edges[j] < value <= edges[j + 1]
            contexts, seen = [], set()
            for value, window in zip(acc.top_values[i].tolist(), acc.top_windows[i].tolist()):
                if not math.isfinite(value) or tuple(window) in seen:  # a text the corpus repeats
                    continue
                seen.add(tuple(window))
                start = next(p for p, t in enumerate(window) if t >= 0)
                tokens = [text(t) for t in window if t >= 0]
                contexts.append({"tokens": tokens, "peak": WINDOW_BEFORE - start,
                                 "activation": round(value, 4)})
            entry["top_contexts"] = contexts[:shown]
        features.append(entry)
    doc = {"format": DASHBOARDS_FORMAT, "sae": sae.info.name, "sae_fingerprint": sae.info.fingerprint,
           "model": model_name, "corpus": corpus, "tokens": acc.tokens, "contexts": acc.contexts,
           "histogram_edges": [0.0, *HIST_EDGES], "features": features}
    path = out_dir / DASHBOARDS_FILE
    tmp = path.with_suffix(".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=9) as fh:
        json.dump(doc, fh, separators=(",", ":"))
    tmp.replace(path)
    return path


def read(folder: str | Path, sae: Sae | None = None) -> dict[str, Any] | None:
    """The dashboards beside an SAE, or None when there are none. With `sae`, they must be
    this SAE's."""
    path = Path(folder) / DASHBOARDS_FILE
    if not path.exists():
        return None
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError, EOFError) as exc:
        raise CorruptFileError(f"{path.name}: cannot read ({type(exc).__name__})") from None
    if doc.get("format") != DASHBOARDS_FORMAT:
        raise CorruptFileError(f"{path.name}: format {doc.get('format')!r}, expected {DASHBOARDS_FORMAT!r}")
    if sae is not None and doc.get("sae_fingerprint") != sae.info.fingerprint:
        raise CorruptFileError(f"{path.name} was built for another SAE ({doc.get('sae')})")
    return doc
