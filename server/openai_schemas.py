"""The OpenAI-compatible edge: request models that convert into `GenerateParams`, a leaf as
`server/schemas.py` is (OpenAI's response and chunk shapes: `server/openai_render.py`).
`model` names the base model or an adapter; steering extras ride in `steering` (what the
`openai` client sends with `extra_body`).

Every OpenAI parameter either works as OpenAI documents it or is refused with 422 naming it:
`n`, `logprobs`/`top_logprobs` (chat), `logprobs`/`echo` (completions) and
`stream_options.include_usage` are implemented; penalties and `logit_bias` are taken only at
their neutral values; `user` is accepted and not used; anything else (tools,
response_format, ...) is refused rather than silently ignored."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from server.errors import InvalidField
from server.params import GenerateParams
from server.schemas import (MAX_MESSAGES, Penalty, Scale, Seed, SteeringFields, Stop, Temperature, Text, TopK, TopP,
                            check_template_extras)

MAX_N = 8            # choices per request (rows of one batch)
MAX_PROMPTS = 16     # prompts in one /v1/completions request
MAX_LOGPROBS = 20    # top log-probabilities per token, as OpenAI allows


class Steering(SteeringFields):
    model_config = ConfigDict(extra="forbid")

    scale: Scale = 1.0


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # `name` and the like reach the chat template

    role: Text = Field(min_length=1, max_length=64)
    content: Text | list[ContentPart] | None = None

    _extras = model_validator(mode="after")(check_template_extras)

    def to_template(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        return {**self.model_dump(exclude={"content"}), "content": content or ""}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


def neutral_only(neutral: Any) -> AfterValidator:
    """For an OpenAI parameter this server takes only at its neutral value."""
    def check(value: Any) -> Any:
        if value != neutral:
            raise ValueError(f"this server supports only {neutral!r}")
        return value
    return AfterValidator(check)


class _Common(BaseModel):
    # Unknown keys are kept so that `unsupported` can name them in a 422.
    model_config = ConfigDict(extra="allow")

    model: str = Field(max_length=256)
    temperature: Temperature = 1.0                               # OpenAI's default
    top_p: TopP = 1.0
    top_k: TopK = 0                                              # vLLM's extra
    seed: Seed | None = None
    stop: Stop = []
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    steering: Steering | None = None
    user: str | None = Field(None, max_length=256)               # accepted, not used
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: Annotated[dict[str, float], neutral_only({})] = {}

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        """OpenAI clients send null for a parameter left at its default (and for one they do
        not use): it means the default here too."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    def unsupported(self) -> None:
        """422 for the first OpenAI parameter this server does not implement."""
        for name in self.model_extra or {}:
            raise InvalidField(name, "this server does not support this parameter")

    def _params(self, adapter: str | None, max_tokens: int | None, logprobs: int | None = None,
                echo: bool = False, **prompt: Any) -> GenerateParams:
        self.unsupported()
        s = self.steering or Steering()
        return GenerateParams(
            **prompt, adapter=adapter, steering_scale=s.scale, **s.steering_params(),
            max_new_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, seed=self.seed, stop=tuple(self.stop), ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            n=self.n, logprobs=logprobs, echo=echo)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionBody(_Common):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> "ChatCompletionBody":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def to_params(self, adapter: str | None) -> GenerateParams:
        return self._params(adapter, self.max_completion_tokens or self.max_tokens,
                            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
                            messages=tuple(m.to_template() for m in self.messages))


TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=2**31 - 1)]], Field(min_length=1)]
PromptIn = (Annotated[Text, Field(min_length=1)]
            | Annotated[list[Annotated[Text, Field(min_length=1)]], Field(min_length=1, max_length=MAX_PROMPTS)]
            | TokenIds
            | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)])


class CompletionBody(_Common):
    prompt: PromptIn
    max_tokens: int | None = Field(16, ge=1)                     # OpenAI's default
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)    # top k; 0: the chosen token's only
    echo: bool = False
    suffix: Annotated[str, neutral_only("")] = ""
    best_of: Annotated[int, neutral_only(1)] = 1

    @model_validator(mode="after")
    def _echo_not_streamed(self) -> "CompletionBody":
        if self.echo and self.stream:
            raise ValueError("echo is not supported with stream")
        return self

    def prompts(self) -> tuple[str | tuple[int, ...], ...]:
        p = self.prompt
        if isinstance(p, str):
            return (p,)
        if all(isinstance(x, int) for x in p):
            return (tuple(p),)
        return tuple(x if isinstance(x, str) else tuple(x) for x in p)

    def to_params(self, adapter: str | None) -> GenerateParams:
        return self._params(adapter, self.max_tokens, logprobs=self.logprobs, echo=self.echo,
                            prompts=self.prompts())


# --- responses -------------------------------------------------------------------------------
