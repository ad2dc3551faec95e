"""Contrastive feature discovery: which SAE features tell two small sets of texts apart, and a
constant steering push built from them.

Each text is read once by the base model up to the SAE's site; its feature activations are
averaged over its tokens (the first token left out, as SAEs are trained without it: its norm
is hundreds of times the rest's). Per feature, over texts:

    diff         mean_a - mean_b
    effect_size  Cohen's d: diff / pooled standard deviation (null where both sets are constant)
    p_value      Welch's two-sided t-test (scipy): 0 where both sets are constant and differ

Features come ranked by |diff|, largest first. `constant_push` turns the top ones into the
pushes of a constant adapter (`fsrl.adapter.constant_adapter`): v_j = scale * diff_j.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fsrl.errors import FsrlError
from fsrl.models import BaseModel
from fsrl.overrides import MIN_CONTRAST_TEXTS
from fsrl.sae import Sae
from fsrl.sites import Site

MIN_TEXTS = MIN_CONTRAST_TEXTS  # a t-test needs two texts a set


@dataclass(frozen=True)
class FeatureContrast:
    index: int
    mean_a: float
    mean_b: float
    diff: float
    effect_size: float | None
    p_value: float | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def text_features(base: BaseModel, sae: Sae, site: Site, token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """Each text's mean SAE activation over its tokens but the first: (texts, d_sae), float64."""
    rows = []
    for ids in token_ids:
        if len(ids) < 2:
            raise FsrlError(f"a text of {len(ids)} token(s): each text needs at least 2 tokens")
        x = base.activations(site, torch.tensor([list(ids)]))[0, 1:]
        rows.append(sae.encode(x.to(sae.W_dec.dtype)).double().mean(0).cpu())
    return torch.stack(rows)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def contrast(a: torch.Tensor, b: torch.Tensor, top: int = 20) -> list[FeatureContrast]:
    """The `top` features by |mean_a - mean_b| of two sets of texts' features (n, d_sae)."""
    from scipy import stats

    if min(len(a), len(b)) < MIN_TEXTS:
        raise FsrlError(f"each set needs at least {MIN_TEXTS} texts, got {len(a)} and {len(b)}")
    a, b = a.double(), b.double()
    mean_a, mean_b = a.mean(0), b.mean(0)
    diff = mean_a - mean_b
    pooled = (((len(a) - 1) * a.var(0) + (len(b) - 1) * b.var(0)) / (len(a) + len(b) - 2)).sqrt()
    effect = diff / pooled
    order = diff.abs().argsort(descending=True, stable=True)[:top]
    order = order[diff[order] != 0]  # a feature that does not differ tells nothing apart
    with warnings.catch_warnings():  # a set whose texts agree exactly: scipy warns, and p is its limit
        warnings.simplefilter("ignore", RuntimeWarning)
        p = stats.ttest_ind(a[:, order].numpy(), b[:, order].numpy(), axis=0, equal_var=False).pvalue
    return [FeatureContrast(int(j), float(mean_a[j]), float(mean_b[j]), float(diff[j]),
                            _finite(float(effect[j])), _finite(float(pj)))
            for j, pj in zip(order.tolist(), p.tolist())]


def constant_push(contrasts: Sequence[FeatureContrast], top: int, scale: float = 1.0) -> dict[int, float]:
    """The top `top` contrasted features as pushes: feature -> scale * diff."""
    return {c.index: scale * c.diff for c in contrasts[:top]}


def read_texts(path: str | Path) -> list[str | list[dict[str, str]]]:
    """A JSON Lines file of texts: each line a string, {"text": ...} or {"messages": [...]}."""
    out: list[str | list[dict[str, str]]] = []
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise FsrlError(f"cannot read {path} ({type(exc).__name__})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            raise FsrlError(f"{path}:{n}: not JSON") from None
        if isinstance(item, dict) and isinstance(item.get("text"), str):
            item = item["text"]
        elif isinstance(item, dict) and isinstance(item.get("messages"), list):
            item = item["messages"]
        if not (isinstance(item, str) or (isinstance(item, list) and all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in item))):
            raise FsrlError(f'{path}:{n}: expected a string, {{"text": ...}} or {{"messages": [...]}}')
        out.append(item)
    return out


def text_token_ids(tokenizer, item: str | Sequence[dict[str, str]]) -> list[int]:
    """A text as its tokenizer reads it (with special tokens); a conversation through the
    model's chat template (no generation prompt: the conversation is the text)."""
    if isinstance(item, str):
        return list(tokenizer(item)["input_ids"])
    try:
        text = tokenizer.apply_chat_template(list(item), tokenize=False)
    except Exception as exc:  # no template, or the template refuses the conversation
        raise FsrlError(f"cannot apply the model's chat template: {type(exc).__name__}: {str(exc)[:200]}") from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
