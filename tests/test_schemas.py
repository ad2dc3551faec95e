"""The HTTP edge on its own (no server): request bodies become plain `GenerateParams`, and what
needs no model is refused here, naming the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fsrl.overrides import MAX_FEATURE_OVERRIDES, FeatureOverride
from server.errors import InvalidField
from server.openai_schemas import ChatCompletionBody, CompletionBody
from server.params import GenerateParams
from server.schemas import AdapterLoadBody, GenerateBody


def fields_of(exc: ValidationError) -> list[str]:
    return [".".join(str(p) for p in e["loc"]) for e in exc.errors()]


def test_a_generate_body_becomes_plain_params_with_its_overrides_as_data():
    body = GenerateBody.model_validate({
        "messages": [{"role": "user", "content": "hi", "name": "ann"}], "adapter": "concise",
        "steering_scale": 0.5, "features": [{"index": 3, "op": "set", "value": 2}, {"index": 9, "op": "ablate"}],
        "steer_positions": "generated", "stop": "\n", "seed": 7, "compare": True, "return_features": 4})
    params = body.to_params()
    assert params == GenerateParams(
        messages=({"role": "user", "content": "hi", "name": "ann"},), adapter="concise", steering_scale=0.5,
        features=(FeatureOverride(3, "set", 2.0), FeatureOverride(9, "ablate", 0.0)),
        steer_positions="generated", stop=("\n",), seed=7, compare=True, return_features=4)


@pytest.mark.parametrize("body, field", [
    ({"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, ""),
    ({}, ""),
    ({"prompt": "hi", "features": [{"index": 1, "op": "set"}]}, "features.0"),
    ({"prompt": "hi", "features": [{"index": 1, "op": "add", "value": 1}, {"index": 1, "op": "ablate"}]},
     "features"),
    ({"prompt": "hi", "features": [{"index": 0, "op": "ablate"}] * (MAX_FEATURE_OVERRIDES + 1)}, "features"),
    ({"prompt": "hi", "features": [{"index": -1, "op": "ablate"}]}, "features.0.index"),
    ({"prompt": "hi", "features": [{"index": 1, "op": "boost", "value": 1}]}, "features.0.op"),
    ({"prompt": "hi", "steering_scale": 1e9}, "steering_scale"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi\ud800"}, "prompt"),
    ({"prompt": "hi", "stop": [""]}, "stop.0"),
    ({"prompt": "hi", "surprise": 1}, "surprise"),
])
def test_what_needs_no_model_is_refused_at_the_edge_naming_the_field(body, field):
    with pytest.raises(ValidationError) as caught:
        GenerateBody.model_validate(body)
    assert field in fields_of(caught.value)


def test_an_adapter_load_body_takes_only_an_id_the_registry_could_serve():
    assert AdapterLoadBody(id="concise-2.1", path="concise").replace is False
    for bad in ({"id": "../x", "path": "p"}, {"id": "a", "path": "p\x00q"}, {"id": "", "path": "p"}):
        with pytest.raises(ValidationError):
            AdapterLoadBody.model_validate(bad)


def test_an_openai_chat_body_carries_the_steering_extras_into_the_same_params():
    body = ChatCompletionBody.model_validate({
        "model": "concise", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_tokens": 12, "temperature": 0.3, "seed": 4, "n": 2, "stop": "END",
        "steering": {"scale": 0.25, "features": [{"index": 5, "op": "unsteer"}], "steer_positions": "generated"}})
    params = body.to_params("concise")
    assert params.adapter == "concise" and params.messages == ({"role": "user", "content": "hi"},)
    assert (params.steering_scale, params.features, params.steer_positions) == (
        0.25, (FeatureOverride(5, "unsteer", 0.0),), "generated")
    assert (params.max_new_tokens, params.temperature, params.seed, params.n, params.stop) == (12, 0.3, 4, 2, ("END",))


def test_an_openai_completion_body_takes_several_prompts_text_or_token_ids():
    params = CompletionBody.model_validate({"model": "m", "prompt": [[1, 2, 3], [4]]}).to_params(None)
    assert params.prompts == ((1, 2, 3), (4,)) and params.adapter is None


def test_an_openai_parameter_we_do_not_implement_is_refused_rather_than_ignored():
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    for extra, field in (({"tools": []}, "tools"), ({"logit_bias": {"5": 1}}, "logit_bias"),
                        ({"presence_penalty": 2.5}, "presence_penalty")):
        with pytest.raises((ValidationError, InvalidField)) as caught:
            ChatCompletionBody.model_validate({**base, **extra}).to_params(None)
        assert field in str(caught.value)
