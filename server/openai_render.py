"""OpenAI's response, chunk and usage shapes for /v1/chat/completions and /v1/completions."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from fsrl.generation import GenerationResult, LogProbs, TokenEvent
from server.serving import GenerationOutcome, PreparedGeneration

TokenText = Callable[[int], str]


def _usage(outcome: GenerationOutcome) -> dict[str, int]:
    p, c = outcome.prepared.prompt_tokens, outcome.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _chat_logprobs(items: Sequence[tuple[int, LogProbs]], text: TokenText) -> dict[str, Any]:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        s = text(token)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8", "replace"))}
    return {"content": [{**entry(token, lp), "top_logprobs": [entry(t, v) for t, v in top]}
                        for token, (lp, top) in items]}


def _completion_logprobs(tokens: Sequence[int], logprobs: Sequence[LogProbs | None], text: TokenText,
                         offset: int = 0) -> dict[str, Any]:
    """OpenAI's legacy shape; a None entry (the echoed prompt's first token) has no
    log-probability."""
    strings = [text(t) for t in tokens]
    offsets = []
    for s in strings:
        offsets.append(offset)
        offset += len(s)
    return {"tokens": strings,
            "token_logprobs": [lp[0] if lp else None for lp in logprobs],
            "top_logprobs": [{text(t): v for t, v in lp[1]} if lp else None for lp in logprobs],
            "text_offset": offsets}


def _choice(index: int, result: GenerationResult, chat: bool, text: TokenText,
            prompt: tuple[str, list[int]] | None) -> dict[str, Any]:
    """`prompt`: the echoed prompt's text and tokens (completions with echo)."""
    logprobs = None
    if chat:
        body: dict[str, Any] = {"message": {"role": "assistant", "content": result.text}}
        if result.logprobs is not None:
            logprobs = _chat_logprobs(list(zip(result.token_ids, result.logprobs)), text)
    else:
        body = {"text": (prompt[0] if prompt else "") + result.text}
        if result.logprobs is not None:
            tokens, scores = list(result.token_ids), list(result.logprobs)
            if prompt:
                tokens = prompt[1] + tokens
                scores = [None, *(result.prompt_logprobs or []), *scores]
            logprobs = _completion_logprobs(tokens, scores, text)
    return {"index": index, **body, **finish(result.finish_reason, result.fired_feature), "logprobs": logprobs}


def finish(reason: str | None, fired_feature: int | None) -> dict[str, Any]:
    """OpenAI's finish_reason ("stop", "length"); a row an `abort_when` condition stopped
    finishes with "stop" and says which feature fired in `fired_feature`."""
    if reason == "feature":
        return {"finish_reason": "stop", "fired_feature": fired_feature}
    return {"finish_reason": reason}


def render_completion(outcome: GenerationOutcome, model: str, chat: bool, text: TokenText) -> dict[str, Any]:
    p = outcome.prepared
    echo = list(zip(p.echo_texts, p.prompt_ids)) if p.echo else None
    choices = [_choice(i, result, chat, text, echo[i // p.n] if echo else None)
               for i, result in enumerate(outcome.results)]
    return {"id": p.id, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": _usage(outcome), "seed": p.seed}


def render_chunk(prepared: PreparedGeneration, model: str, chat: bool, index: int, text: str | None,
                 finish_reason: str | None = None, role: bool = False,
                 event: TokenEvent | None = None, token_text: TokenText | None = None,
                 fired_feature: int | None = None) -> dict[str, Any]:
    logprobs = None
    if event is not None and event.logprobs is not None and token_text is not None:
        logprobs = (_chat_logprobs([(event.token_id, event.logprobs)], token_text) if chat
                    else _completion_logprobs([event.token_id], [event.logprobs], token_text))
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": index, "delta": delta}
    else:
        choice = {"index": index, "text": text or ""}
    choice.update(**finish(finish_reason, fired_feature), logprobs=logprobs)
    if event is not None and event.telemetry is not None:  # fsrl's extra: OpenAI clients ignore it
        choice["telemetry"] = event.telemetry
    return {"id": prepared.id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}


def render_usage_chunk(outcome: GenerationOutcome, model: str, chat: bool) -> dict[str, Any]:
    """The last chunk with `stream_options.include_usage`: no choices, the usage."""
    return {"id": outcome.prepared.id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [], "usage": _usage(outcome)}
