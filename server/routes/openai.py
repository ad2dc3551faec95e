from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Request

from server import serving
from server.deps import StateDep
from server.errors import ModelNotFound
from server.http_errors import STREAM_RESPONSE
from server.openai_render import render_chunk, render_completion, render_usage_chunk
from server.openai_schemas import ChatCompletionBody, CompletionBody
from server.routes.cancel import cancel_on_disconnect
from server.routes.sse import sse_response
from server.state import ServerState

router = APIRouter(prefix="/v1", tags=["openai"])


def _adapter_for(state: ServerState, model: str) -> str | None:
    if model == state.base.name:
        return None
    if model in state.registry:
        return model
    raise ModelNotFound(f"unknown model {model!r}: use {state.base.name!r} or a loaded adapter id")


@router.get("/models")
async def list_models(state: StateDep) -> dict:
    created = int(state.started_at)
    data = [{"id": state.base.name, "object": "model", "created": created, "owned_by": "fsrl"}]
    data += [{"id": e.id, "object": "model", "created": int(e.loaded_at), "owned_by": "fsrl",
              "parent": state.base.name} for e in state.registry.entries()]
    return {"object": "list", "data": data}


@router.post("/chat/completions", responses=STREAM_RESPONSE)
async def chat_completions(body: ChatCompletionBody, state: StateDep, request: Request):
    return await _complete(state, request, body, chat=True)


@router.post("/completions", responses=STREAM_RESPONSE)
async def completions(body: CompletionBody, state: StateDep, request: Request):
    return await _complete(state, request, body, chat=False)


async def _complete(state: ServerState, request: Request, body: ChatCompletionBody | CompletionBody,
                    chat: bool):
    prepared = await serving.prepare(state, body.to_params(_adapter_for(state, body.model)),
                                     id_prefix="chatcmpl" if chat else "cmpl")
    if body.stream:
        return sse_response(_chunks(state, prepared, body.model, chat, body.include_usage),
                            state.settings.stream_send_timeout, openai=True)
    outcome = await cancel_on_disconnect(request, serving.run(state, prepared))
    return render_completion(outcome, body.model, chat, state.token_text)


async def _chunks(state: ServerState, prepared: serving.PreparedGeneration, model: str,
                  chat: bool, include_usage: bool) -> AsyncIterator[dict]:
    async for chunk in _choice_chunks(state, prepared, model, chat):
        if isinstance(chunk, serving.GenerationOutcome):
            if include_usage:
                yield render_usage_chunk(chunk, model, chat)
            continue
        if include_usage:  # as OpenAI: every chunk but the last carries "usage": null
            chunk["usage"] = None
        yield chunk


async def _choice_chunks(state: ServerState, prepared: serving.PreparedGeneration, model: str,
                         chat: bool) -> AsyncIterator[dict | serving.GenerationOutcome]:
    if chat:
        for index in range(len(prepared.job.requests)):
            yield render_chunk(prepared, model, chat, index, "", role=True)
    async with aclosing(serving.stream(state, prepared)) as items:
        async for item in items:
            if isinstance(item, serving.GenerationOutcome):
                yield item
                continue
            if item.text_delta or item.logprobs is not None or item.telemetry is not None:
                yield render_chunk(prepared, model, chat, item.row, item.text_delta, event=item,
                                   token_text=state.token_text)
            if item.finished:
                yield render_chunk(prepared, model, chat, item.row, None if chat else "", item.finish_reason,
                                   fired_feature=item.fired_feature)
