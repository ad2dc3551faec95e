"""The HTTP edge of /generate and /adapters: pydantic request models that convert themselves
into plain parameters (`server.params`). A leaf: no torch, no engine (`server/render.py`
renders results as API.md's JSON).

Everything checkable without the model is checked here (types, ranges, finiteness, one op
per index, at most 256 overrides), so a bad request is a 422 naming its field before any
work is queued. What depends on the served SAE and model (index < d_sae, the token caps) is
checked in `serving.prepare`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator,
                      model_validator)

from fsrl.overrides import (MAX_CONDITIONS, MAX_CONTRAST_TEXT_CHARS, MAX_CONTRAST_TEXTS, MAX_CONTRAST_TOP,
                            MIN_CONTRAST_TEXTS, MAX_FEATURE_OVERRIDES, MAX_FEATURE_VALUE, MAX_RETURN_FEATURES,
                            MAX_STEERING_SCALE, OPS, OPS_NEEDING_VALUE, Condition, FeatureOverride)
from fsrl.sampling import MIN_TEMPERATURE
from server.params import ADAPTER_ID, GenerateParams

# The request bounds, in one place; docs/api.md lists them and the OpenAPI schema shows them.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 64
MAX_MESSAGES = 1024
MAX_TEMPERATURE = 100.0
MAX_TOP_K = 1_000_000
MAX_INDEX = 2**31 - 1


def _valid_unicode(text: str) -> str:
    """JSON can carry lone surrogates (\\ud800); no tokenizer can encode them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"holds a lone surrogate at character {exc.start} (not valid Unicode)") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
StopString = Annotated[Text, Field(min_length=1, max_length=MAX_STOP_CHARS)]


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else ([] if value is None else value)


Stop = Annotated[list[StopString], BeforeValidator(_as_list), Field(max_length=MAX_STOP_STRINGS)]
Temperature = Annotated[float, Field(ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False,
                                     description=f"0, or below {MIN_TEMPERATURE:g}: greedy")]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
TopK = Annotated[int, Field(ge=0, le=MAX_TOP_K)]
Seed = Annotated[int, Field(ge=0, lt=2**63)]
# OpenAI's range; off a token's logit before it is chosen (greedy too), over the generated tokens.
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]


def exactly_one(model: BaseModel, *fields: str) -> BaseModel:
    """`model`, once exactly one of `fields` is given (not None)."""
    if sum(getattr(model, name) is not None for name in fields) != 1:
        raise ValueError(f"give exactly one of {', '.join(fields[:-1])} and {fields[-1]}")
    return model


Threshold = Annotated[float, Field(ge=-MAX_FEATURE_VALUE, le=MAX_FEATURE_VALUE, allow_inf_nan=False)]


class ConditionIn(BaseModel):
    """Feature `index`'s activation before steering, at the SAE's site, above or below a threshold."""

    model_config = ConfigDict(extra="forbid")

    index: int = Field(ge=0, le=MAX_INDEX)
    above: Threshold | None = None
    below: Threshold | None = None

    @model_validator(mode="after")
    def _one_comparison(self) -> "ConditionIn":
        return exactly_one(self, "above", "below")

    def to_internal(self) -> Condition:
        if self.above is not None:
            return Condition(self.index, "above", float(self.above))
        return Condition(self.index, "below", float(self.below))


class FeatureIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: int = Field(ge=0, le=MAX_INDEX)  # the upper bound, d_sae, is the served SAE's
    op: Literal[OPS]
    value: float | None = Field(None, ge=-MAX_FEATURE_VALUE, le=MAX_FEATURE_VALUE, allow_inf_nan=False)
    when: ConditionIn | None = None

    @model_validator(mode="after")
    def _value_when_needed(self) -> "FeatureIn":
        if self.value is None and self.op in OPS_NEEDING_VALUE:
            raise ValueError(f"op {self.op!r} needs a value")
        return self

    def to_internal(self) -> FeatureOverride:
        return FeatureOverride(self.index, self.op, float(self.value or 0.0),
                               self.when.to_internal() if self.when is not None else None)


Features = Annotated[list[FeatureIn], Field(max_length=MAX_FEATURE_OVERRIDES)]
AbortWhen = Annotated[list[ConditionIn], Field(max_length=MAX_CONDITIONS)]


def check_condition_count(features: list[FeatureIn], abort_when: list[ConditionIn] = ()) -> None:
    """At most MAX_CONDITIONS conditions a request: `features[].when` and `abort_when` together."""
    count = sum(f.when is not None for f in features) + len(abort_when)
    if count > MAX_CONDITIONS:
        raise ValueError(f"at most {MAX_CONDITIONS} conditions a request (features[].when and "
                         f"abort_when together), got {count}")


class SteeringFields(BaseModel):
    """The steering a /generate body and the /v1 routes' `steering` extra both take."""

    features: Features = []
    abort_when: AbortWhen = []
    steer_positions: Literal["all", "generated"] = "all"
    telemetry: bool = False  # streamed tokens carry what the steering did there

    @field_validator("features")
    @classmethod
    def _features_rules(cls, features: list[FeatureIn]) -> list[FeatureIn]:
        check_condition_count(features)
        return check_unique_indices(features)

    @field_validator("abort_when")
    @classmethod
    def _at_most_conditions(cls, abort_when: list[ConditionIn], info) -> list[ConditionIn]:
        check_condition_count(info.data.get("features") or [], abort_when)
        return abort_when

    def steering_params(self) -> dict[str, Any]:
        """These fields as `GenerateParams` takes them."""
        return dict(features=tuple(f.to_internal() for f in self.features),
                    abort_when=tuple(c.to_internal() for c in self.abort_when),
                    steer_positions=self.steer_positions, telemetry=self.telemetry)
Scale = Annotated[float, Field(ge=-MAX_STEERING_SCALE, le=MAX_STEERING_SCALE, allow_inf_nan=False)]


def check_unique_indices(features: list[FeatureIn]) -> list[FeatureIn]:
    seen: set[int] = set()
    for f in features:
        if f.index in seen:
            raise ValueError(f"index {f.index} has more than one op (one op per index)")
        seen.add(f.index)
    return features


def check_template_extras(message: BaseModel) -> BaseModel:
    """Keys beyond role and content reach the chat template (a `name`, say): text only."""
    for key, value in (message.model_extra or {}).items():
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{key}: must be a string or null")
        if isinstance(value, str):
            _valid_unicode(value)
    return message


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # chat templates may read more keys (name, ...)

    role: Text = Field(min_length=1, max_length=64)
    content: Text

    _extras = model_validator(mode="after")(check_template_extras)


class GenerateBody(SteeringFields):
    model_config = ConfigDict(extra="forbid")

    prompt: Text | None = Field(None, min_length=1)
    messages: list[Message] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    adapter: str | None = Field(None, max_length=128)
    steering_scale: Scale = 1.0
    max_new_tokens: int = Field(64, ge=1, le=MAX_INDEX)  # the real bound is the server's cap
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    top_k: TopK = 0
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    seed: Seed | None = None
    stop: Stop = []
    ignore_eos: bool = False
    compare: bool = False
    return_features: int = Field(0, ge=0, le=MAX_RETURN_FEATURES)
    stream: bool = False

    @model_validator(mode="after")
    def _prompt_xor_messages(self) -> "GenerateBody":
        return exactly_one(self, "prompt", "messages")

    def to_params(self) -> GenerateParams:
        return GenerateParams(
            prompt=self.prompt,
            messages=tuple(m.model_dump() for m in self.messages) if self.messages else None,
            adapter=self.adapter, steering_scale=self.steering_scale,
            **self.steering_params(), max_new_tokens=self.max_new_tokens,
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            stop=tuple(self.stop), ignore_eos=self.ignore_eos, compare=self.compare,
            return_features=self.return_features)


MAX_CONTRAST_MESSAGES = 32
MAX_CONSTANT_FEATURES = 4096


ContrastText = Annotated[Text, Field(min_length=1, max_length=MAX_CONTRAST_TEXT_CHARS)] | Annotated[
    list[Message], Field(min_length=1, max_length=MAX_CONTRAST_MESSAGES)]
ContrastTexts = Annotated[list[ContrastText], Field(min_length=MIN_CONTRAST_TEXTS, max_length=MAX_CONTRAST_TEXTS)]


class ContrastBody(BaseModel):
    """Two small sets of texts (a string, or a conversation as a list of messages)."""

    model_config = ConfigDict(extra="forbid")

    a: ContrastTexts
    b: ContrastTexts
    top: int = Field(20, ge=1, le=MAX_CONTRAST_TOP)


class ConstantPushIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: int = Field(ge=0, le=MAX_INDEX)
    value: float = Field(ge=-MAX_FEATURE_VALUE, le=MAX_FEATURE_VALUE, allow_inf_nan=False)


class ConstantIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    features: Annotated[list[ConstantPushIn], Field(min_length=1, max_length=MAX_CONSTANT_FEATURES)]

    @field_validator("features")
    @classmethod
    def _one_push_per_index(cls, features: list[ConstantPushIn]) -> list[ConstantPushIn]:
        if len({f.index for f in features}) < len(features):
            raise ValueError("one push per index")
        return features


class ContrastAdapterIn(BaseModel):
    """A constant push from a contrast: v_j = scale * (mean_a_j - mean_b_j) on the top features."""

    model_config = ConfigDict(extra="forbid")

    a: ContrastTexts
    b: ContrastTexts
    top: int = Field(16, ge=1, le=MAX_CONTRAST_TOP)
    scale: Scale = 1.0


class AdapterLoadBody(BaseModel):
    """Load a folder (`path`), or build a constant adapter (`constant`, `contrast`) into the
    adapters directory and load it: exactly one of the three."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=ADAPTER_ID.pattern)
    path: str | None = Field(None, min_length=1, max_length=4096, pattern=r"^[^\x00]+$")  # no path holds a NUL
    constant: ConstantIn | None = None
    contrast: ContrastAdapterIn | None = None
    replace: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> "AdapterLoadBody":
        return exactly_one(self, "path", "constant", "contrast")
