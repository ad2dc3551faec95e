from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from server.deps import StateDep

router = APIRouter(tags=["operations"])
open_router = APIRouter(tags=["operations"])  # no API key: probes


@open_router.get("/health")
async def health(state: StateDep) -> dict:
    return {"status": "ok", "model": state.base.name, "sae": state.sae.info.name,
            "layer": state.layer, "device": str(state.base.device),
            "packed_cpu_weights": state.packed_cpu_weights,
            "compiled_decode": state.compiled_decode, "adapters": len(state.registry)}


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(state: StateDep) -> str:
    return state.metrics.render(queue_depth=state.engine.pending,
                                batch_rows=state.engine.running_rows)
