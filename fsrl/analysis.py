"""Reading an adapter: which features it pushes, measured on real activations.

An adapter's v depends on the residual stream it reads, so "the features it pushes hardest" is
measured: mean v and the share of tokens where v is non-zero, over activations at the hook
layer. Training measures them on its held-out pairs; the server on a reference set of prompts
captured once at start (`reference_activations`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fsrl.adapter import FsrlAdapter
from fsrl.models import BaseModel
from fsrl.sae import Sae
from fsrl.sites import Site


@torch.no_grad()
def hook_activations(base: BaseModel, site: Site, token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """The residual stream at `site` for every token of every
    sequence but the first (its norm is hundreds of times the rest's; SAEs train without it):
    (tokens, d_model), on the model's device."""
    captured = [base.activations(site, torch.tensor([list(ids)]))[0, 1:]
                for ids in token_ids if len(ids) >= 2]
    if not captured:
        return torch.zeros(0, base.d_model, device=base.device, dtype=base.dtype)
    return torch.cat(captured)


def reference_token_ids(tokenizer, limit: int = 96) -> list[list[int]]:
    """The project's own demo prompts (every third, up to `limit`), as the model's chat
    template renders them where it has one."""
    from fsrl.prompts import demo_prompts

    out = []
    for prompt in demo_prompts()[::3][:limit]:
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt.text}],
                                                 add_generation_prompt=True, tokenize=False)
        except Exception:  # no chat template: the plain text
            text = prompt.text
        out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out


@dataclass(frozen=True)
class FeaturePush:
    """Per feature, over tokens: mean v, mean |v| (what rankings use: opposite-sign pushes of a
    soft-threshold adapter do not cancel in it) and the share of tokens with v != 0."""

    mean_v: torch.Tensor
    mean_abs_v: torch.Tensor
    active_share: torch.Tensor

    @classmethod
    def from_sums(cls, v_sum: torch.Tensor, abs_sum: torch.Tensor, active: torch.Tensor,
                  tokens: float) -> "FeaturePush":
        n = max(tokens, 1)
        return cls(*((t.double() / n).float().cpu() for t in (v_sum, abs_sum, active)))


@torch.no_grad()
def feature_push(adapter: FsrlAdapter, activations: torch.Tensor, chunk: int = 1024) -> FeaturePush:
    """How the adapter pushes each feature over `activations` (N, d_in)."""
    d_sae = adapter.config.d_sae
    sums = torch.zeros(3, d_sae, dtype=torch.float64, device=activations.device)
    for start in range(0, activations.shape[0], chunk):
        v = adapter(activations[start:start + chunk].to(adapter.W.device)).to(sums.device).double()
        sums += torch.stack([v.sum(0), v.abs().sum(0), (v != 0).double().sum(0)])
    return FeaturePush.from_sums(*sums, activations.shape[0])


def top_features(push: FeaturePush, sae: Sae, k: int = 20) -> list[dict[str, Any]]:
    """The k features with the largest mean |v| over tokens, with their SAE labels."""
    order = push.mean_abs_v.argsort(descending=True)[:k]
    return [{"index": int(i), "mean_abs_v": round(float(push.mean_abs_v[i]), 5),
             "mean_v": round(float(push.mean_v[i]), 5),
             "active_share": round(float(push.active_share[i]), 4), "label": sae.label(int(i)),
             "label_source": sae.info.label_sources.get(int(i))}
            for i in order if push.mean_abs_v[i] != 0]
