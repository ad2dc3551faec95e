"""Internal results as API.md's JSON for /generate (the OpenAI shapes: `server/openai_render.py`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from fsrl.generation import GenerationResult, TokenEvent
from server.params import ROWS
from server.serving import GenerationOutcome, PreparedGeneration

Label = Callable[[int], str | None]


def render_features(features: list[tuple[int, float]], label: Label) -> list[dict[str, Any]]:
    """`delta` is null where it is not a finite number (JSON has no Infinity)."""
    return [{"index": i, "label": label(i), "delta": d if math.isfinite(d) else None} for i, d in features]


def render_output(result: GenerationResult, label: Label, with_features: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"text": result.text, "finish_reason": result.finish_reason,
                           "completion_tokens": result.completion_tokens}
    if result.fired_feature is not None:
        out["fired_feature"] = result.fired_feature
    if result.telemetry is not None:
        out["telemetry"] = result.telemetry
    if with_features:
        out["features"] = [render_features(step, label) for step in result.features or []]
    return out


def render_generation(outcome: GenerationOutcome, model: str, label: Label) -> dict[str, Any]:
    p = outcome.prepared
    return {
        "id": p.id, "model": model, "adapter": p.adapter_id, "seed": p.seed,
        "steered": render_output(outcome.steered, label, p.return_features > 0),
        "base": render_output(outcome.base, label, False) if outcome.base else None,
        "usage": {"prompt_tokens": p.prompt_tokens, "completion_tokens": outcome.completion_tokens},
        "timing": {"queue_ms": round(outcome.queue_ms, 3), "total_ms": round(outcome.total_ms, 3)},
    }


def render_token_event(prepared: PreparedGeneration, event: TokenEvent, label: Label) -> dict[str, Any]:
    """One streamed token; `output` tells the steered row from the base row."""
    out: dict[str, Any] = {"type": "token", "id": prepared.id, "output": ROWS[event.row],
                           "token_id": event.token_id if event.has_token else None,
                           "text": event.text_delta, "finish_reason": event.finish_reason}
    if event.fired_feature is not None:
        out["fired_feature"] = event.fired_feature
    if event.telemetry is not None:
        out["telemetry"] = event.telemetry
    if event.row == 0 and prepared.return_features:
        out["features"] = render_features(event.features or [], label)
    return out
