"""The OpenAI-compatible edge: request models that convert into `GenerateParams`, and the
renderers of OpenAI's response and chunk shapes. `model` names the base model or an adapter;
steering extras ride in `steering` (what the `openai` client sends with `extra_body`).
Unknown OpenAI parameters are ignored, as vLLM does; those that would change the answer in a
way we cannot honour (n > 1) are refused."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fsrl.generation import GenerationResult
from server.schemas import Features, Scale, Stop, check_unique_indices
from server.serving import GenerateParams, GenerationOutcome, PreparedGeneration


class Steering(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scale: Scale = 1.0
    features: Features = []
    steer_positions: Literal["all", "generated"] = "all"

    @field_validator("features")
    @classmethod
    def _one_op_per_index(cls, features):
        return check_unique_indices(features)


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str = Field(min_length=1)
    content: str | list[ContentPart] | None = None

    def to_template(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        return {**self.model_dump(exclude={"content"}), "content": content or ""}


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float = Field(1.0, ge=0.0, allow_inf_nan=False)  # OpenAI's default
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)                                     # vLLM's extra
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: Stop = []
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    ignore_eos: bool = False
    steering: Steering | None = None

    def _params(self, adapter: str | None, max_tokens: int | None, **prompt: Any) -> GenerateParams:
        s = self.steering or Steering()
        return GenerateParams(
            **prompt, adapter=adapter, steering_scale=s.scale,
            features=tuple(f.to_internal() for f in s.features), steer_positions=s.steer_positions,
            max_new_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, seed=self.seed, stop=tuple(self.stop), ignore_eos=self.ignore_eos)


class ChatCompletionBody(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def to_params(self, adapter: str | None) -> GenerateParams:
        return self._params(adapter, self.max_completion_tokens or self.max_tokens,
                            messages=tuple(m.to_template() for m in self.messages))


class CompletionBody(_Common):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ValueError("exactly one prompt is supported")
            prompt = prompt[0]
        if not prompt:
            raise ValueError("must not be empty")
        return prompt

    def to_params(self, adapter: str | None) -> GenerateParams:
        return self._params(adapter, self.max_tokens, prompt=self.prompt)


def _usage(outcome: GenerationOutcome) -> dict[str, int]:
    p, c = outcome.prepared.prompt_tokens, outcome.steered.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _choice(result: GenerationResult, chat: bool) -> dict[str, Any]:
    body = ({"message": {"role": "assistant", "content": result.text}} if chat
            else {"text": result.text})
    return {"index": 0, **body, "finish_reason": result.finish_reason, "logprobs": None}


def render_completion(outcome: GenerationOutcome, model: str, chat: bool) -> dict[str, Any]:
    return {"id": outcome.prepared.id, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model,
            "choices": [_choice(outcome.steered, chat)], "usage": _usage(outcome),
            "seed": outcome.prepared.seed}


def render_chunk(prepared: PreparedGeneration, model: str, chat: bool, text: str | None,
                 finish_reason: str | None = None, role: bool = False) -> dict[str, Any]:
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta}
    else:
        choice = {"index": 0, "text": text or ""}
    choice.update(finish_reason=finish_reason, logprobs=None)
    return {"id": prepared.id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}
