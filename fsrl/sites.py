"""Where an SAE reads the model, and the one way fsrl reaches that place.

A site is `(layer, kind)` in TransformerLens's terms:

    resid_pre  of layer L    the residual stream *entering* decoder layer L (its input;
                             the same tensor as resid_post of L-1; for L = 0, the embeddings
                             as the model scales them)
    resid_post of layer L    the residual stream *leaving* decoder layer L (its output, before
                             any final norm)

Only these are steerable as `x' = x + d @ W_dec` exactly: the stream at a layer boundary is
what the next layer reads, whole. An SAE on a block's inside (resid_mid, mlp_out, attn_out,
hook_z) or a transcoder reads something else, and steering it as if it read the stream would
push in the wrong place with no error; such hook names are refused at load.

Every public spelling of a hook name maps to one `Site` through `HOOK_SPELLINGS`, one row per
spelling. `attach` is the only place that puts a function on the stream at a site, and every
caller (steering, activation capture, training, analysis) goes through it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from fsrl.errors import FsrlError

SiteKind = Literal["resid_pre", "resid_post"]
SITE_KINDS: tuple[SiteKind, ...] = ("resid_pre", "resid_post")


class UnsteerableSiteError(FsrlError):
    """An SAE whose hook is not a residual stream at a layer boundary (or cannot be read)."""


@dataclass(frozen=True)
class Site:
    layer: int
    kind: SiteKind = "resid_post"

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise FsrlError(f"unknown site kind {self.kind!r}; expected one of {', '.join(SITE_KINDS)}")
        if self.layer < 0:
            raise FsrlError(f"site layer {self.layer} is negative")

    @property
    def hook_name(self) -> str:
        """The TransformerLens name, which fsrl shows everywhere (/health, cards, errors)."""
        return f"blocks.{self.layer}.hook_{self.kind}"

    def __str__(self) -> str:
        return self.hook_name

    def at_layer(self, layer: int) -> "Site":
        return Site(layer, self.kind)


# One row per public spelling: pattern (the layer is group 1) -> the kind it names. Hook names
# are matched whole, so "blocks.3.hook_resid_post.hook_sae_acts" or "...mlp" never slip through.
HOOK_SPELLINGS: tuple[tuple[str, SiteKind, str], ...] = (
    (r"blocks\.(\d+)\.hook_resid_pre", "resid_pre", "TransformerLens / sae-lens"),
    (r"blocks\.(\d+)\.hook_resid_post", "resid_post", "TransformerLens / sae-lens, Llama Scope"),
    (r"(?:model\.(?:language_model\.)?)?layers\.(\d+)", "resid_post",
     "transformers module output, sparsify `layers.L`"),
    (r"model\.(?:language_model\.)?layers\.(\d+)\.output", "resid_post", "Gemma Scope 2 hf_hook_point_in"),
    (r"model\.(?:language_model\.)?layers\.(\d+)\.input", "resid_pre", "a decoder layer's input"),
    (r"(?:transformer\.)?h\.(\d+)", "resid_post", "GPT-2 module output"),
    (r"gpt_neox\.layers\.(\d+)", "resid_post", "GPT-NeoX / Pythia module output"),
)
_COMPILED = tuple((re.compile(pattern), kind) for pattern, kind, _ in HOOK_SPELLINGS)
STEERABLE = "blocks.L.hook_resid_pre, blocks.L.hook_resid_post (also spelled model.layers.L, layers.L, model.layers.L.output)"


def parse_hook_name(hook_name: str) -> Site:
    """The site a hook name names, in any public spelling; `UnsteerableSiteError` otherwise."""
    name = hook_name.strip()
    for pattern, kind in _COMPILED:
        m = pattern.fullmatch(name)
        if m:
            return Site(int(m.group(1)), kind)
    raise UnsteerableSiteError(
        f"SAE hook {hook_name!r} is not a site fsrl can steer exactly; it steers the residual "
        f"stream at a layer boundary: {STEERABLE}")


def attach(layers: nn.ModuleList, site: Site,
           fn: Callable[[torch.Tensor], torch.Tensor | None]) -> RemovableHandle:
    """Run `fn(x)` on the residual stream at `site` on every forward; `x` is (B, T, d_model).
    If it returns a tensor, that tensor replaces the stream there (None: leave it)."""
    if not 0 <= site.layer < len(layers):
        raise FsrlError(f"site {site} is out of range: the model has {len(layers)} layers")
    block = layers[site.layer]
    if site.kind == "resid_post":
        def on_output(module: nn.Module, args: tuple, output):
            hidden = output[0] if isinstance(output, tuple) else output
            new = fn(hidden)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return block.register_forward_hook(on_output)

    def on_input(module: nn.Module, args: tuple, kwargs: dict):
        # Decoder layers take the stream first: positionally in most families, by name in some.
        if args:
            new = fn(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        if "hidden_states" not in kwargs:
            raise FsrlError(f"cannot find the input of {type(module).__name__} to steer {site}")
        new = fn(kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})
    return block.register_forward_pre_hook(on_input, with_kwargs=True)
