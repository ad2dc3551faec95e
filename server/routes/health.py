from fastapi import APIRouter
from fastapi.responses import PlainTextResponse, Response

from server.canary import model_runner
from server.deps import StateDep
from server.errors import EngineStopped
from server.metrics import CONTENT_TYPE

router = APIRouter(tags=["operations"])
open_router = APIRouter(tags=["operations"])  # no API key: probes


@open_router.get("/health")
async def health(state: StateDep) -> dict:
    """200 while the server can generate; 503 once its generation worker has stopped."""
    if not state.engine.alive:
        raise EngineStopped("the generation engine has stopped; the server needs a restart "
                            "(its log says why)")
    return {"status": "ok", "worker": "running", "model": state.base.name, "sae": state.sae.info.name,
            "layer": state.layer, "site": state.site.hook_name, "sae_hook_name": state.sae.info.hook_name,
            "device": str(state.base.device),
            "packed_cpu_weights": state.packed_cpu_weights,
            "compiled_decode": state.compiled_decode, "engine": state.settings.engine,
            "model_runner": model_runner(state),
            "adapters": len(state.registry)}


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(state: StateDep) -> Response:
    """Prometheus's text format (prometheus_client)."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)
