import asyncio
from typing import Annotated

from fastapi import APIRouter, Query

from server.contrasts import build_constant_adapter
from server.deps import StateDep
from server.schemas import AdapterLoadBody

router = APIRouter(prefix="/adapters", tags=["adapters"])


@router.get("")
async def list_adapters(state: StateDep) -> dict:
    return {"adapters": [state.registry.describe(e) for e in state.registry.entries()]}


@router.get("/{adapter_id}")
async def get_adapter(adapter_id: str, state: StateDep) -> dict:
    return state.registry.describe(state.registry.entry(adapter_id))


@router.post("", status_code=201)
async def load_adapter(body: AdapterLoadBody, state: StateDep) -> dict:
    """Load an adapter folder (`path`), or build a constant adapter from a list of pushes
    (`constant`) or a contrast of two sets of texts (`contrast`) and load it."""
    if body.path is None:
        entry = await build_constant_adapter(state, body)
    else:
        entry = await state.registry.load(body.id, body.path, replace=body.replace)
    return state.registry.describe(entry)


@router.delete("/{adapter_id}")
async def unload_adapter(adapter_id: str, state: StateDep) -> dict:
    await state.registry.unload(adapter_id)
    return {"id": adapter_id, "status": "unloaded"}


@router.get("/{adapter_id}/features")
async def adapter_features(adapter_id: str, state: StateDep,
                           top: Annotated[int, Query(ge=1, le=4096)] = 20) -> dict:
    """Ranked by mean v over the server's reference prompts (measured once per adapter)."""
    features = await asyncio.to_thread(state.registry.top_features, adapter_id, top)
    return {"adapter": adapter_id, "measured_on_tokens": state.registry.reference.shape[0],
            "features": features}


@router.get("/{adapter_id}/card")
async def adapter_card(adapter_id: str, state: StateDep) -> dict:
    """The summary of the adapter's `fsrl analyze` report, when one sits beside it."""
    return await asyncio.to_thread(state.registry.card, adapter_id)
