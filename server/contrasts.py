"""Contrasts of two sets of texts on the served SAE (POST /features/contrast), and constant
adapters built from one or from a list of pushes (POST /adapters with `contrast` or
`constant`). Tokenising runs on the preparation thread; the forwards on the engine's model
(`call_model`: between decode steps on the default engine, the host copy on vLLM)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from fsrl.adapter import constant_adapter, read_adapter_config, save_adapter
from fsrl.contrast import FeatureContrast, constant_push, contrast, text_features, text_token_ids
from fsrl.errors import ConflictError, FsrlError
from server.errors import InvalidField
from server.registry import LoadedAdapter
from server.schemas import AdapterLoadBody, Message
from server.state import ServerState

ContrastText = str | Sequence[Message]


def _token_ids(state: ServerState, texts: Sequence[ContrastText], field_name: str) -> list[list[int]]:
    out = []
    for n, item in enumerate(texts):
        where = f"{field_name}[{n}]"
        try:
            ids = text_token_ids(state.base.tokenizer, item if isinstance(item, str) else [m.model_dump() for m in item])
        except FsrlError as exc:
            raise InvalidField(where, str(exc)) from None
        if len(ids) < 2:
            raise InvalidField(where, f"encodes to {len(ids)} token(s); a text needs at least 2")
        if len(ids) > state.settings.max_prompt_tokens:
            raise InvalidField(where, f"{len(ids)} tokens; this server takes at most {state.settings.max_prompt_tokens}")
        out.append(ids)
    return out


async def run_contrast(state: ServerState, a: Sequence[ContrastText], b: Sequence[ContrastText],
                       top: int) -> list[FeatureContrast]:
    loop = asyncio.get_running_loop()
    ids_a, ids_b = await loop.run_in_executor(
        state.prepare_thread, lambda: (_token_ids(state, a, "a"), _token_ids(state, b, "b")))
    features_a = await state.engine.call_model(lambda: text_features(state.base, state.sae, state.site, ids_a))
    features_b = await state.engine.call_model(lambda: text_features(state.base, state.sae, state.site, ids_b))
    return contrast(features_a, features_b, top)


def render_contrast(state: ServerState, found: Sequence[FeatureContrast]) -> list[dict[str, Any]]:
    classes = state.features.classes if state.features is not None else {}
    return [{**c.to_json(), "label": state.sae.label(c.index), "class": classes.get(c.index)} for c in found]


async def build_constant_adapter(state: ServerState, body: AdapterLoadBody) -> LoadedAdapter:
    """The constant adapter `body` asks for, written to the adapters directory under its id
    and loaded like any other. An existing folder is replaced only with `replace` and only
    when it holds a constant adapter too (a trained adapter's files are never written over)."""
    if body.contrast is not None:
        c = body.contrast
        found = await run_contrast(state, c.a, c.b, c.top)
        pushes = constant_push(found, c.top, c.scale)
        built_from = {"kind": "contrast", "a_texts": len(c.a), "b_texts": len(c.b), "top": c.top,
                      "scale": c.scale, "features": [f.to_json() for f in found]}
    else:
        pushes = {f.index: f.value for f in body.constant.features}
        built_from = {"kind": "features", "features": [{"index": j, "value": v} for j, v in pushes.items()]}
    if not pushes:
        raise InvalidField("contrast", "no feature differs between the two sets: nothing to push")
    for j in pushes:
        if j >= state.sae.d_sae:
            raise InvalidField("constant", f"index {j} is out of range [0, {state.sae.d_sae})")
    folder = state.settings.adapters_dir / body.id
    if folder.exists():
        if not body.replace:
            raise ConflictError(f"the adapters directory already has a folder {body.id!r}; "
                                "send replace: true to write a new constant adapter over it")
        if read_adapter_config(folder, where=body.id).activation != "constant":
            raise ConflictError(f"folder {body.id!r} holds a trained adapter; a constant adapter "
                                "is never written over one: pick another id")
    adapter = constant_adapter(body.id, state.sae, state.base.name, state.base.fingerprint, state.layer,
                               pushes, built_from)
    await asyncio.get_running_loop().run_in_executor(state.prepare_thread, save_adapter, adapter, folder)
    return await state.registry.load(body.id, body.id, replace=body.replace)
