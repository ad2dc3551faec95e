"""Steering telemetry: what the steering did at the position that predicts each token (its norm
in the residual stream, the features it pushed, the conditions that passed) and the KL
divergence of the steered next-token distribution from the compare row's."""

from __future__ import annotations

import json

import torch

import _server_fixtures as fixtures
from fsrl.generation import GenerationRequest, Generator
from fsrl.overrides import Condition, FeatureOverride
from fsrl.sampling import SamplingParams
from fsrl.steering import RowSteering, SteeringBatch
from fsrl.testing import tiny_base, tiny_sae

setup, app_factory, client = fixtures.setup, fixtures.app_factory, fixtures.client
PROMPT = [5, 6, 7, 8]
SAMPLING = SamplingParams(max_new_tokens=6, ignore_eos=True)


def test_an_add_op_s_norm_is_its_value_times_its_decoder_row_at_every_token():
    """`add v` on feature j moves the residual by exactly v * W_dec[j]: its norm, one feature
    pushed, no condition; an unsteered row asking for telemetry reads zeros."""
    base, sae = tiny_base(), tiny_sae()
    gen = Generator(base, sae, layer=1)
    add = RowSteering(overrides=[FeatureOverride(9, "add", 3.0)])
    got = gen.generate([GenerationRequest(PROMPT, add, SAMPLING, telemetry=True),
                        GenerationRequest(PROMPT, RowSteering(), SAMPLING, telemetry=True)])
    want = float((3.0 * sae.W_dec[9]).norm())
    assert len(got[0].telemetry) == 6
    for t in got[0].telemetry:
        assert abs(t["norm"] - want) <= 1e-5 * want and (t["pushed"], t["conditions"], t["kl"]) == (1, [], None)
    assert all(t == {"norm": 0.0, "pushed": 0, "conditions": [], "kl": None} for t in got[1].telemetry)


def test_conditions_that_passed_are_named_at_the_tokens_where_they_did():
    base, sae = tiny_base(), tiny_sae()
    gen = Generator(base, sae, layer=1)
    always, never = Condition(0, "below", 1e4), Condition(0, "above", 1e4)
    steering = RowSteering(overrides=[FeatureOverride(9, "add", 3.0, when=always),
                                      FeatureOverride(11, "add", 2.0, when=never)])
    got = gen.generate([GenerationRequest(PROMPT, steering, SAMPLING, telemetry=True)])[0]
    assert all(t["conditions"] == [9] and t["pushed"] == 1 for t in got.telemetry)


def test_the_kl_is_taken_from_the_compare_row_s_distribution_at_the_same_step():
    """Step 0 reads the same prompt on both rows: its KL is the one of the steered and the plain
    forward on the prompt, computed here; the same steering on both rows gives 0."""
    base, sae = tiny_base(), tiny_sae()
    gen = Generator(base, sae, layer=1)
    steering = RowSteering(overrides=[FeatureOverride(3, "set", 40.0)])
    steered = GenerationRequest(PROMPT, steering, SAMPLING, telemetry=True, compare_with=1)
    got = gen.generate([steered, GenerationRequest(PROMPT, RowSteering(), SAMPLING)])
    ids = torch.tensor([PROMPT])
    positions = torch.arange(len(PROMPT))[None]
    logits = [gen.forward(ids, torch.ones_like(ids), positions, None,
                          SteeringBatch.build([row], sae.d_sae))[0][0].double().log_softmax(-1)
              for row in (steering, RowSteering())]
    want = float((logits[0].exp() * (logits[0] - logits[1])).sum())
    assert want > 1e-4 and abs(got[0].telemetry[0]["kl"] - want) <= 1e-4 * want
    assert all(t["kl"] is not None for t in got[0].telemetry)
    same = gen.generate([GenerationRequest(PROMPT, steering, SAMPLING, telemetry=True, compare_with=1),
                         GenerationRequest(PROMPT, steering, SAMPLING)])
    assert all(t["kl"] < 1e-6 * want for t in same[0].telemetry)  # 0, to float rounding


def test_a_streamed_compare_run_carries_telemetry_on_every_steered_token(client):
    body = {"prompt": "hello there", "adapter": "tiny", "compare": True, "telemetry": True,
            "max_new_tokens": 8, "ignore_eos": True, "stream": True}
    with client.stream("POST", "/generate", json=body) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    tokens = [e for e in events if e.get("type") == "token"]
    steered = [e for e in tokens if e["output"] == "steered"]
    assert len(steered) == 8 and all(e["telemetry"]["norm"] > 0 and e["telemetry"]["kl"] >= 0 for e in steered)
    assert all("telemetry" not in e for e in tokens if e["output"] == "base")
    final = events[-1]["response"]
    assert [t for t in final["steered"]["telemetry"]] == [e["telemetry"] for e in steered]
    assert "telemetry" not in final["base"]


def test_openai_chunks_carry_telemetry_as_an_extra_field(client):
    body = {"model": client.get("/v1/models").json()["data"][1]["id"], "prompt": "hello", "max_tokens": 4,
            "temperature": 0, "ignore_eos": True, "stream": True, "steering": {"telemetry": True}}
    with client.stream("POST", "/v1/completions", json=body) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    carried = [c["choices"][0]["telemetry"] for c in chunks if "telemetry" in c["choices"][0]]
    assert len(carried) == 4 and all(t["norm"] > 0 and t["kl"] is None for t in carried)
