from typing import Annotated

from fastapi import APIRouter, Query

from server.deps import AdminKey, StateDep
from server.schemas import AdapterLoadBody

router = APIRouter(prefix="/adapters", tags=["adapters"])


@router.get("")
async def list_adapters(state: StateDep) -> dict:
    return {"adapters": [e.describe() for e in state.registry.entries()]}


@router.get("/{adapter_id}")
async def get_adapter(adapter_id: str, state: StateDep) -> dict:
    return state.registry.entry(adapter_id).describe()


@router.post("", status_code=201, dependencies=[AdminKey])
async def load_adapter(body: AdapterLoadBody, state: StateDep) -> dict:
    entry = await state.registry.load(body.id, body.path, replace=body.replace)
    return entry.describe()


@router.delete("/{adapter_id}", dependencies=[AdminKey])
async def unload_adapter(adapter_id: str, state: StateDep) -> dict:
    await state.registry.unload(adapter_id)
    return {"id": adapter_id, "status": "unloaded"}


@router.get("/{adapter_id}/features")
async def adapter_features(adapter_id: str, state: StateDep,
                           top: Annotated[int, Query(ge=1, le=4096)] = 20) -> dict:
    return {"adapter": adapter_id, "features": state.registry.top_features(adapter_id, top)}
