from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Request

from server import serving
from server.deps import StateDep
from server.http_errors import STREAM_RESPONSE
from server.routes.cancel import cancel_on_disconnect
from server.routes.sse import sse_response
from server.render import render_generation, render_token_event
from server.schemas import GenerateBody
from server.state import ServerState

router = APIRouter(tags=["generate"])


@router.post("/generate", responses=STREAM_RESPONSE)
async def generate(body: GenerateBody, state: StateDep, request: Request):
    prepared = await serving.prepare(state, body.to_params())
    if body.stream:
        return sse_response(_events(state, prepared), state.settings.stream_send_timeout)
    outcome = await cancel_on_disconnect(request, serving.run(state, prepared))
    return render_generation(outcome, state.base.name, state.sae.label)


async def _events(state: ServerState, prepared: serving.PreparedGeneration) -> AsyncIterator[dict]:
    async with aclosing(serving.stream(state, prepared)) as items:
        async for item in items:
            if isinstance(item, serving.GenerationOutcome):
                yield {"type": "response",
                       "response": render_generation(item, state.base.name, state.sae.label)}
            else:
                yield render_token_event(prepared, item, state.sae.label)
