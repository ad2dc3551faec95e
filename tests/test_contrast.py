"""Steering found without training: contrasts of two sets of texts (the statistics, the
features of a text, the route and the command) and constant adapters (the file, the push,
the same steering path as a learned adapter, built over HTTP)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import _server_fixtures as fixtures
from _server_fixtures import assert_error
from fsrl.adapter import WEIGHTS_FILE, constant_adapter, load_adapter, save_adapter
from fsrl.contrast import constant_push, contrast, text_features
from fsrl.overrides import FeatureOverride
from fsrl.steering import RowSteering, SteeringBatch, steer
from fsrl.testing import tiny_adapter, tiny_base, tiny_sae

setup, app_factory, client = fixtures.setup, fixtures.app_factory, fixtures.client
FP32 = dict(rtol=1e-5, atol=5e-5)
A = ["The cat sat on the warm mat today.", "A cat slept in the sun all day.", "Cats chase mice at night."]
B = ["Stock markets fell sharply on Monday.", "The bank raised interest rates again.", "Bond yields rose this week."]


def test_the_statistics_of_a_contrast_are_the_textbook_ones():
    """Feature 0: A = {1, 3}, B = {0, 0}: diff 2, pooled sd 1 (Cohen's d 2), Welch's t = 2 on
    one degree of freedom, so p = 1 - (2/pi) atan(2). Feature 1 does not differ: left out.
    Feature 2 differs less, and comes second."""
    a = torch.tensor([[1.0, 5.0, 0.5], [3.0, 5.0, 0.5]])
    b = torch.tensor([[0.0, 5.0, 0.0], [0.0, 5.0, 0.2]])
    found = contrast(a, b, top=3)
    assert [c.index for c in found] == [0, 2]
    first = found[0]
    assert (first.mean_a, first.mean_b, first.diff, first.effect_size) == (2.0, 0.0, 2.0, 2.0)
    assert math.isclose(first.p_value, 1 - 2 / math.pi * math.atan(2), rel_tol=1e-9)
    assert constant_push(found, 1, scale=0.5) == {0: 1.0}


def test_two_constant_sets_that_differ_have_no_finite_effect_size_and_p_zero():
    found = contrast(torch.tensor([[2.0], [2.0]]), torch.tensor([[1.0], [1.0]]))
    assert (found[0].diff, found[0].effect_size, found[0].p_value) == (1.0, None, 0.0)


def test_a_text_s_features_are_its_tokens_mean_activation_without_the_first():
    base, sae = tiny_base(), tiny_sae()
    site = sae.site_at(1)
    ids = [[1, 5, 6, 7, 8], [1, 9, 10]]
    got = text_features(base, sae, site, ids)
    for row, text in zip(got, ids):
        x = base.activations(site, torch.tensor([text]))[0, 1:]
        torch.testing.assert_close(row, sae.encode(x).double().mean(0))


def test_a_constant_adapter_stores_its_push_alone_and_steers_as_add_ops_do(tmp_path):
    """The file holds b (and b_in), no map; v = b at every position; steering with it equals
    `add` ops of the same values; in a bank row (vLLM's path) it gives the same v."""
    from safetensors import safe_open

    from fsrl.adapter import RowAdapters

    sae = tiny_sae()
    pushes = {3: 4.0, 17: -2.5, 40: 1.25}
    adapter = constant_adapter("push", sae, "tiny", "fp", 1, pushes, {"kind": "features"})
    folder = save_adapter(adapter, tmp_path / "push")
    with safe_open(folder / WEIGHTS_FILE, "pt") as fh:
        assert set(fh.keys()) == {"b", "b_in"}
    loaded = load_adapter(folder, sae=sae, layer=1)
    assert loaded.config.activation == "constant" and loaded.parameter_count() == sae.d_sae
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1)) * 3
    v = loaded(x)
    assert v.shape == (2, 5, sae.d_sae) and torch.equal(v[1, 4], loaded.b)
    assert {j: float(loaded.b[j]) for j in loaded.b.nonzero().squeeze(-1).tolist()} == pushes
    positions = torch.arange(5).expand(2, -1)
    by_adapter = steer(x, sae, SteeringBatch.build([RowSteering(loaded, 2.0)] * 2, sae.d_sae), positions).x
    adds = [FeatureOverride(j, "add", 2.0 * value) for j, value in pushes.items()]
    by_ops = steer(x, sae, SteeringBatch.build([RowSteering(None, 1.0, adds)] * 2, sae.d_sae), positions).x
    torch.testing.assert_close(by_adapter, by_ops, **FP32)
    assert not torch.allclose(by_adapter, x)
    rows = RowAdapters(2, 64, sae.d_sae)
    rows.set_row(0, loaded)
    rows.set_row(1, tiny_adapter(sae))
    assert torch.equal(rows.by_slot(x[0], torch.zeros(5, dtype=torch.long)), v[0])


def test_contrast_route_ranks_features_with_statistics_labels_and_classes(client):
    r = client.post("/features/contrast", json={"a": A, "b": [[{"role": "user", "content": t}] for t in B], "top": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["a_texts"], body["b_texts"], len(body["features"])) == (3, 3, 5)
    diffs = [abs(f["diff"]) for f in body["features"]]
    assert diffs == sorted(diffs, reverse=True) and diffs[0] > 0
    first = body["features"][0]
    assert set(first) == {"index", "mean_a", "mean_b", "diff", "effect_size", "p_value", "label", "class"}
    assert math.isclose(first["diff"], first["mean_a"] - first["mean_b"], rel_tol=1e-9, abs_tol=1e-12)
    assert first["label"] == (f"feature {first['index']}" if first["index"] % 2 == 0 else None)


@pytest.mark.parametrize("body, field", [
    ({"a": ["one text"], "b": B}, "a"),
    ({"a": A, "b": ["x"] * 65}, "b"),
    ({"a": A, "b": B, "top": 0}, "top"),
    ({"a": A, "b": ["", "y"]}, "b"),
    ({"a": A, "b": ["x" * 8193, "y"]}, "b"),
    ({"a": A}, "b"),
], ids=["one-text", "65-texts", "top-0", "empty-text", "text-too-long", "no-b"])
def test_a_bad_contrast_is_422_naming_the_field(client, body, field):
    assert_error(client.post("/features/contrast", json=body), 422, field)


def test_a_constant_adapter_built_over_http_steers_as_its_pushes_do(client, setup):
    pushes = [{"index": 4, "value": 30.0}, {"index": 9, "value": -20.0}]
    r = client.post("/adapters", json={"id": "pushes", "constant": {"features": pushes}})
    assert r.status_code == 201, r.text
    assert r.json()["metadata"]["activation"] == "constant"
    assert r.json()["metadata"]["training"]["built_from"] == {"kind": "features", "features": pushes}
    assert (setup.adapters_dir / "pushes" / "adapter.json").is_file()
    body = {"prompt": "hello there", "max_new_tokens": 12, "ignore_eos": True, "compare": True}
    by_adapter = client.post("/generate", json={**body, "adapter": "pushes"}).json()
    by_ops = client.post("/generate", json={**body, "features": [{**p, "op": "add"} for p in pushes]}).json()
    assert by_adapter["steered"]["text"] == by_ops["steered"]["text"] != by_adapter["base"]["text"]
    # A second build under that id replaces it only when asked.
    again = client.post("/adapters", json={"id": "pushes", "constant": {"features": pushes[:1]}})
    assert_error(again, 409, "replace")
    assert client.post("/adapters", json={"id": "pushes", "constant": {"features": pushes[:1]},
                                          "replace": True}).status_code == 201
    assert client.delete("/adapters/pushes").status_code == 200


def test_a_constant_adapter_from_a_contrast_pushes_its_top_features(client):
    r = client.post("/adapters", json={"id": "from-contrast", "contrast": {"a": A, "b": B, "top": 4, "scale": 2.0}})
    assert r.status_code == 201, r.text
    built = r.json()["metadata"]["training"]["built_from"]
    assert built["kind"] == "contrast" and len(built["features"]) == 4
    features = client.get("/adapters/from-contrast/features", params={"top": 4}).json()["features"]
    assert {f["index"] for f in features} == {f["index"] for f in built["features"]}
    for f in features:  # a constant push: v is 2 * diff on every reference token
        diff = next(c["diff"] for c in built["features"] if c["index"] == f["index"])
        assert math.isclose(f["mean_v"], 2.0 * diff, rel_tol=1e-5)
    assert client.delete("/adapters/from-contrast").status_code == 200


def test_a_constant_adapter_is_never_written_over_a_trained_one(client):
    r = client.post("/adapters", json={"id": "tiny", "constant": {"features": [{"index": 1, "value": 1.0}]},
                                       "replace": True})
    assert_error(r, 409, "trained adapter")
    assert client.get("/adapters/tiny").json()["metadata"]["activation"] != "constant"


def test_constant_and_contrast_commands_write_adapters_and_refuse_bad_input_in_one_line(setup, tmp_path, capsys):
    from fsrl.cli import main

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"text": t}) + "\n" for t in A))
    b.write_text("".join(json.dumps(t) + "\n" for t in B))
    common = ["--model", str(setup.model_dir), "--sae", str(setup.sae_dir), "--device", "cpu"]
    assert main(["features", "contrast", str(a), str(b), "--top", "3", "--out", str(tmp_path / "c.json"),
                 "--adapter-out", str(tmp_path / "steer"), "--adapter-top", "2", *common]) == 0
    report = json.loads((tmp_path / "c.json").read_text())
    assert len(report["features"]) == 3
    adapter = load_adapter(tmp_path / "steer")
    assert adapter.b.count_nonzero() == 2
    assert float(adapter.b[report["features"][0]["index"]]) == pytest.approx(report["features"][0]["diff"])
    assert main(["adapter", "constant", "--push", "3=2.5", "--push", "7=-1", "--out", str(tmp_path / "two"), *common]) == 0
    assert load_adapter(tmp_path / "two").b.nonzero().squeeze(-1).tolist() == [3, 7]
    capsys.readouterr()
    assert main(["adapter", "constant", "--push", "3:2", "--out", str(tmp_path / "bad"), *common]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "expected J=VALUE" in err


def test_a_contrast_taken_while_a_steered_request_decodes_changes_neither(client):
    """The contrast's forwards run between the engine's decode steps, where no steering is set:
    the same features as on an idle server, and the steered request's text as when alone."""
    body = {"prompt": "the quick brown fox", "adapter": "tiny", "features": [{"index": 3, "op": "set", "value": 40.0}],
            "max_new_tokens": 200, "ignore_eos": True}
    alone = client.post("/generate", json=body).json()["steered"]["text"]
    idle = client.post("/features/contrast", json={"a": A, "b": B}).json()
    with client.stream("POST", "/generate", json={**body, "stream": True}) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # decoding has begun
        during = client.post("/features/contrast", json={"a": A, "b": B}).json()
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert during == idle
    assert events[-1]["type"] == "response" and events[-1]["response"]["steered"]["text"] == alone
    assert events[-1]["response"]["steered"]["completion_tokens"] == 200
