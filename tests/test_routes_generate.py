"""POST /generate on the tiny server (uvicorn in a test thread, and again on `fsrl serve --engine vllm`): the contract's shape,
steering, sampling and stop conditions, streaming, and the requests it refuses (in the error shape, naming the field)."""

from __future__ import annotations

import pytest

from fsrl.testing import D_SAE, read_sse

import _server_fixtures as fixtures
from _server_fixtures import CAP, assert_error, generate

# Fixtures the server's test files share: pytest finds them by these names.
# Both engines (`engine`); tests that need the default engine's process take `default_engine`.
engine, default_engine = fixtures.engine, fixtures.default_engine
setup, app_factory, client = fixtures.engine_setup, fixtures.app_factory, fixtures.engine_client


def test_generate_with_prompt_answers_the_contract_shape(client, setup):
    out = generate(client, prompt="hello there", max_new_tokens=6)
    assert out.keys() == {"id", "model", "adapter", "seed", "steered", "base", "usage", "timing"}
    assert out["model"] == setup.model_dir.name and out["adapter"] is None and out["base"] is None
    steered = out["steered"]
    assert steered.keys() == {"text", "finish_reason", "completion_tokens"}
    assert steered["finish_reason"] in ("stop", "length") and 1 <= steered["completion_tokens"] <= 6
    assert out["usage"] == {"prompt_tokens": len("hello there"),
                            "completion_tokens": steered["completion_tokens"]}
    assert out["timing"]["total_ms"] >= out["timing"]["queue_ms"] >= 0


def test_generate_with_messages_applies_the_chat_template(client):
    out = generate(client, messages=[{"role": "user", "content": "hi"}], max_new_tokens=3)
    assert out["usage"]["prompt_tokens"] == len("user: hi\nassistant: ")  # one token a character


def test_compare_steered_differs_from_base_and_base_equals_a_plain_request(client):
    common = {"prompt": "hello there", "max_new_tokens": 12, "ignore_eos": True}
    out = generate(client, adapter="tiny", steering_scale=3.0, compare=True, **common)
    plain = generate(client, **common)
    assert out["steered"]["text"] != out["base"]["text"]
    assert out["base"]["text"] == plain["steered"]["text"]
    assert "features" not in out["base"]
    assert out["usage"]["completion_tokens"] == 24  # both rows were generated


def test_presence_and_frequency_penalties_change_the_answer_and_the_openai_route_applies_them_alike(client):
    common = {"max_new_tokens": 24, "ignore_eos": True, "adapter": "tiny"}
    penalties = {"presence_penalty": 1.5, "frequency_penalty": 0.5}
    messages = [{"role": "user", "content": "hi"}]
    penalised = generate(client, messages=messages, **common, **penalties)["steered"]["text"]
    assert penalised != generate(client, messages=messages, **common)["steered"]["text"]
    reply = client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, "temperature": 0,
                                                      "max_tokens": 24, "ignore_eos": True, **penalties})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == penalised


def test_feature_clamps_change_the_output(client):
    common = {"prompt": "hello there", "max_new_tokens": 12, "ignore_eos": True}
    clamped = generate(client, features=[{"index": i, "op": "set", "value": 30.0} for i in range(8)],
                       **common)
    assert clamped["steered"]["text"] != generate(client, **common)["steered"]["text"]


def test_steering_generated_positions_leaves_the_first_token_to_the_base(client):
    out = generate(client, prompt="hello there", adapter="tiny", steering_scale=3.0, compare=True,
                   steer_positions="generated", max_new_tokens=12, ignore_eos=True, return_features=1)
    assert out["steered"]["features"][0] == []  # nothing steered while reading the prompt
    assert out["steered"]["text"] != out["base"]["text"]


def test_same_seed_gives_the_same_sample_and_another_seed_differs(client):
    body = {"prompt": "hello", "temperature": 1.0, "max_new_tokens": 12, "ignore_eos": True}
    a, b = generate(client, seed=7, **body), generate(client, seed=7, **body)
    c = generate(client, seed=8, **body)
    assert a["seed"] == 7 and a["steered"]["text"] == b["steered"]["text"] != c["steered"]["text"]


def test_null_seed_is_picked_by_the_server_and_reproduces(client):
    body = {"prompt": "hello", "temperature": 1.0, "max_new_tokens": 12, "ignore_eos": True}
    first = generate(client, seed=None, **body)
    assert isinstance(first["seed"], int)
    assert generate(client, seed=first["seed"], **body)["steered"]["text"] == first["steered"]["text"]


def test_stop_string_cuts_the_text_and_finishes_with_stop(client):
    body = {"prompt": "hello there", "max_new_tokens": 16, "ignore_eos": True}
    free = generate(client, **body)["steered"]["text"]
    stop = free[4:6]
    out = generate(client, stop=stop, **body)["steered"]  # a single string is a list of one
    assert out["text"] == free[:free.find(stop)] and out["finish_reason"] == "stop"


def test_ignore_eos_runs_to_max_new_tokens_with_finish_reason_length(client):
    out = generate(client, prompt="hi", max_new_tokens=20, ignore_eos=True)["steered"]
    assert out["completion_tokens"] == 20 and out["finish_reason"] == "length"


def test_return_features_gives_top_steered_features_per_generated_token(client):
    out = generate(client, prompt="hello", adapter="tiny", max_new_tokens=5, ignore_eos=True,
                   return_features=3)["steered"]
    assert len(out["features"]) == out["completion_tokens"] == 5
    for step in out["features"]:
        assert 1 <= len(step) <= 3
        for f in step:
            assert f.keys() == {"index", "label", "delta"} and 0 <= f["index"] < D_SAE
            assert f["label"] == (f"feature {f['index']}" if f["index"] % 2 == 0 else None)
        deltas = [abs(f["delta"]) for f in step]
        assert deltas == sorted(deltas, reverse=True)


def test_stream_sends_token_events_then_the_response_then_done(client):
    body = {"prompt": "hello", "adapter": "tiny", "compare": True, "max_new_tokens": 4,
            "ignore_eos": True, "stream": True, "seed": 3}
    with client.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events, done = read_sse(r)
    assert done
    tokens, final = events[:-1], events[-1]
    assert final["type"] == "response"
    assert [e["output"] for e in tokens].count("steered") == [e["output"] for e in tokens].count("base") == 4
    for output in ("steered", "base"):
        text = "".join(e["text"] for e in tokens if e["output"] == output)
        assert text == final["response"][output]["text"]
    plain = generate(client, **{**body, "stream": False})
    assert final["response"]["steered"] == plain["steered"]


# --- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, field", [
    ({"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "hi", "features": [{"index": 1, "op": "boost", "value": 1.0}]}, "features[0].op"),
    ({"prompt": "hi", "features": [{"index": D_SAE, "op": "set", "value": 1.0}]}, "features"),
    ({"prompt": "hi", "features": [{"index": -1, "op": "ablate"}]}, "features[0].index"),
    ({"prompt": "hi", "features": [{"index": 1, "op": "set", "value": 1.0},
                                   {"index": 1, "op": "ablate"}]}, "features"),
    ({"prompt": "hi", "features": [{"index": i % D_SAE, "op": "ablate"} for i in range(257)]}, "features"),
    ({"prompt": "hi", "features": [{"index": 1, "op": "set"}]}, "features[0]"),
    ({"prompt": "hi", "steering_scale": 100.5}, "steering_scale"),
    ({"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": "hi", "max_new_tokens": CAP + 1}, "max_new_tokens"),
    ({"prompt": "hi", "temperature": -0.1}, "temperature"),
    ({"prompt": "hi", "top_p": 0.0}, "top_p"),
    ({"prompt": "hi", "top_k": -1}, "top_k"),
    ({"prompt": "hi", "return_features": 65}, "return_features"),
    ({"prompt": "hi", "steer_positions": "prompt"}, "steer_positions"),
    ({"prompt": "hi", "stop": [""]}, "stop"),
    ({"prompt": "hi", "temprature": 1.0}, "temprature"),
    ({"prompt": "hi", "features": [{"index": 1, "op": "ablate", "when": {"index": 2, "above": 1, "below": 3}}]},
     "features[0].when"),
    ({"prompt": "hi", "features": [{"index": 1, "op": "ablate", "when": {"index": 2}}]}, "features[0].when"),
    ({"prompt": "hi", "features": [{"index": 1, "op": "ablate", "when": {"index": D_SAE, "above": 0}}]}, "features"),
    ({"prompt": "hi", "abort_when": [{"index": D_SAE, "above": 0}]}, "abort_when"),
    ({"prompt": "hi", "abort_when": [{"index": 3, "below": 1e5}]}, "abort_when[0].below"),
    ({"prompt": "hi", "abort_when": [{"index": i, "above": 0} for i in range(17)]}, "abort_when"),
    ({"prompt": "hi", "features": [{"index": i, "op": "ablate", "when": {"index": 0, "above": 0}} for i in range(17)]},
     "features"),
    ({"prompt": "hi", "features": [{"index": i, "op": "ablate", "when": {"index": 0, "above": 0}} for i in range(10)],
      "abort_when": [{"index": i, "above": 0} for i in range(7)]}, "abort_when"),
], ids=["prompt-and-messages", "neither", "bad-op", "index-too-big", "index-negative",
        "duplicate-index", "257-features", "set-without-value", "scale-over-100",
        "max-new-tokens-0", "max-new-tokens-over-cap", "negative-temperature", "top-p-0",
        "negative-top-k", "return-features-65", "bad-steer-positions", "empty-stop",
        "unknown-field", "when-above-and-below", "when-without-threshold", "when-index-too-big",
        "abort-index-too-big", "abort-threshold-too-big", "17-aborts", "17-whens", "10-whens-and-7-aborts"])
def test_invalid_generate_request_is_422_naming_the_field(client, body, field):
    assert_error(client.post("/generate", json=body), 422, field)


@pytest.mark.parametrize("raw", ['{"prompt": "hi", "steering_scale": NaN}',
                                 '{"prompt": "hi", "steering_scale": Infinity}',
                                 '{"prompt": "hi", "steering_scale": 1e999}'],
                         ids=["nan", "infinity", "overflow"])
def test_non_finite_steering_scale_is_422(client, raw):
    r = client.post("/generate", content=raw, headers={"content-type": "application/json"})
    assert_error(r, 422, "steering_scale")


def test_prompt_plus_max_new_tokens_beyond_the_model_positions_is_422(client):
    assert_error(client.post("/generate", json={"prompt": "x" * 450, "max_new_tokens": CAP}),
                 422, "max_new_tokens", "450")


def test_unknown_adapter_is_404(client):
    assert_error(client.post("/generate", json={"prompt": "hi", "adapter": "nope"}), 404, "nope")


def test_malformed_json_is_answered_in_the_error_shape(client):
    r = client.post("/generate", content=b'{"prompt": "hi",', headers={"content-type": "application/json"})
    assert assert_error(r, 422, "JSON")["code"] == "invalid_json"
