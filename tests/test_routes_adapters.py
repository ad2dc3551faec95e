"""/adapters on the tiny server (uvicorn in a test thread, and again on `fsrl serve --engine vllm`): the adapters found at start,
loading, replacing and unloading by id, the paths a load may name, feature rankings, and the device budget."""

from __future__ import annotations

import pytest

from fsrl.sites import Site
from fsrl.testing import D_SAE, LAYER

import _server_fixtures as fixtures
from _server_fixtures import assert_error, generate

# Fixtures the server's test files share: pytest finds them by these names.
# Both engines (`engine`); tests that need the default engine's process take `default_engine`.
engine, default_engine = fixtures.engine, fixtures.default_engine
setup, app_factory, client = fixtures.engine_setup, fixtures.app_factory, fixtures.engine_client


def test_adapters_at_start_are_the_valid_folders_and_broken_ones_are_skipped(client, engine):
    adapters = client.get("/adapters").json()["adapters"]
    assert [a["id"] for a in adapters] == ["tiny"]  # corrupt, other-sae, escape, no-meta skipped
    tiny = adapters[0]
    assert tiny["status"] == "loaded" and tiny["device"] == "cpu"
    assert tiny["parameters"] == fixtures.HIDDEN[engine] * D_SAE + D_SAE
    # W, b, b_in and tau (kept whatever the activation), float32 on the CPU
    assert (tiny["bytes"], tiny["dtype"]) == (4 * (fixtures.HIDDEN[engine] * (D_SAE + 1) + 2 * D_SAE), "float32")
    metrics = client.get("/metrics").text
    assert "fsrl_adapters_loaded 1.0" in metrics and f"fsrl_adapter_bytes {float(tiny['bytes'])}" in metrics
    assert tiny["metadata"]["format"] == "fsrl-adapter" and tiny["metadata"]["d_sae"] == D_SAE


def test_get_adapter_by_id_and_unknown_is_404(client):
    assert client.get("/adapters/tiny").json()["id"] == "tiny"
    assert_error(client.get("/adapters/nope"), 404, "nope")


def test_adapter_features_are_measured_on_the_reference_prompts_with_sae_labels(client, setup):
    from fsrl.adapter import load_adapter
    from fsrl.analysis import feature_push, hook_activations, reference_token_ids
    from fsrl.models import load_base_model

    r = client.get("/adapters/tiny/features", params={"top": 5})
    assert r.status_code == 200, r.text
    features = r.json()["features"]
    # The same measurement made here, on the same files.
    base = load_base_model(str(setup.model_dir), "cpu")
    reference = hook_activations(base, Site(LAYER), reference_token_ids(base.tokenizer))
    push = feature_push(load_adapter(setup.adapters_dir / "tiny"), reference)
    assert r.json()["measured_on_tokens"] == reference.shape[0] > 100
    assert [f["index"] for f in features] == push.mean_abs_v.argsort(descending=True)[:5].tolist()
    for f in features:
        assert f["mean_abs_v"] == pytest.approx(float(push.mean_abs_v[f["index"]]), abs=1e-4)
        assert f["mean_v"] == pytest.approx(float(push.mean_v[f["index"]]), abs=1e-4)
        assert f["active_share"] == pytest.approx(float(push.active_share[f["index"]]), abs=1e-4)
        assert f["label"] == (f"feature {f['index']}" if f["index"] % 2 == 0 else None)


def test_adapter_features_after_a_replace_are_the_new_weights(client):
    def top(adapter_id: str) -> list[tuple[int, float]]:
        r = client.get(f"/adapters/{adapter_id}/features", params={"top": 5})
        assert r.status_code == 200, r.text
        return [(f["index"], f["mean_v"]) for f in r.json()["features"]]
    assert client.post("/adapters", json={"id": "feat", "path": "tiny"}).status_code == 201
    try:
        before = top("feat")  # measured, and cached, for the first weights
        swap = {"id": "feat", "path": "more/tiny-b", "replace": True}
        assert client.post("/adapters", json=swap).status_code == 201
        assert client.post("/adapters", json={"id": "feat-b", "path": "more/tiny-b"}).status_code == 201
        assert top("feat") == top("feat-b") != before
    finally:
        for adapter_id in ("feat", "feat-b"):
            client.delete(f"/adapters/{adapter_id}")


def test_load_adapter_201_then_409_then_replace_then_delete(client):
    r = client.post("/adapters", json={"id": "copy", "path": "tiny"})
    assert r.status_code == 201 and r.json()["id"] == "copy"
    assert_error(client.post("/adapters", json={"id": "copy", "path": "tiny"}), 409, "copy")
    assert client.post("/adapters", json={"id": "copy", "path": "tiny", "replace": True}).status_code == 201
    assert generate(client, prompt="hi", adapter="copy", max_new_tokens=2)["adapter"] == "copy"
    assert client.delete("/adapters/copy").status_code == 200
    assert_error(client.post("/generate", json={"prompt": "hi", "adapter": "copy"}), 404, "copy")


def test_replace_leaves_a_request_already_under_way_on_the_old_weights(setup, client, default_engine):
    import asyncio

    from server import serving
    from server.settings import Settings
    from server.state import load_state

    state = load_state(Settings(model=str(setup.model_dir), sae=setup.sae_dir,
                                adapters_dir=setup.adapters_dir, device="cpu"))
    params = serving.GenerateParams(prompt="hello there", adapter="tiny", steering_scale=3.0,
                                    max_new_tokens=10, ignore_eos=True)

    async def replace_between_prepare_and_run():
        started = await serving.prepare(state, params)  # holds the adapter it was given
        await state.registry.load("tiny", "more/tiny-b", replace=True)
        later = await serving.prepare(state, params)
        return [(await serving.run(state, p)).steered.text for p in (started, later)]

    try:
        old, new = asyncio.run(replace_between_prepare_and_run())
    finally:
        state.close()
    served_by_old = generate(client, **{k: getattr(params, k) for k in
                                        ("prompt", "adapter", "steering_scale", "max_new_tokens", "ignore_eos")})
    assert old == served_by_old["steered"]["text"] != new


def test_with_one_device_slot_each_adapter_is_paged_in_as_asked_and_answers_as_if_resident(
        app_factory, client, default_engine):
    body = {"prompt": "hello there", "max_new_tokens": 8, "ignore_eos": True}
    with app_factory(adapter_slots=1) as c:
        status = lambda: {a["id"]: a["status"] for a in c.get("/adapters").json()["adapters"]}  # noqa: E731
        slots = c.app_state["fsrl"].engine.slots
        assert status() == {"tiny": "loaded"}  # the steering canary's probe paged it in at start
        assert c.post("/adapters", json={"id": "b", "path": "more/tiny-b"}).status_code == 201
        assert status() == {"tiny": "loaded", "b": "offloaded"}  # loaded into host memory only
        b = c.post("/generate", json={**body, "adapter": "b"}).json()["steered"]["text"]
        assert status() == {"tiny": "offloaded", "b": "loaded"}
        tiny = c.post("/generate", json={**body, "adapter": "tiny"}).json()["steered"]["text"]
        assert status() == {"tiny": "loaded", "b": "offloaded"}
        assert c.post("/generate", json={**body, "adapter": "tiny"}).json()["steered"]["text"] == tiny
        assert (slots.pager.page_ins, slots.pager.evictions, len(slots.copies)) == (3, 2, 1)
        metrics = c.get("/metrics").text
        assert all(line in metrics for line in ("fsrl_adapter_slots 1.0", "fsrl_adapter_slots_used 1.0",
                                                "fsrl_adapter_page_ins_total 3.0", "fsrl_adapter_evictions_total 2.0"))
    # Paging in and out changes nothing: the same text as a server with every adapter resident.
    assert tiny == generate(client, adapter="tiny", **body)["steered"]["text"] != b


def test_requests_for_more_adapters_than_slots_wait_their_turn_and_none_fails(app_factory, client, default_engine):
    """Six concurrent requests over three adapters on one slot: each waits until the running
    one's adapter is free to go out, and every answer is its adapter's alone."""
    from concurrent.futures import ThreadPoolExecutor

    body = {"prompt": "hello there", "max_new_tokens": 12, "ignore_eos": True}
    with app_factory(adapter_slots=1) as c:
        for new_id, path in (("b", "more/tiny-b"), ("c", "more/tiny-b")):
            assert c.post("/adapters", json={"id": new_id, "path": path}).status_code == 201
        order = ["tiny", "b", "c", "tiny", "b", "c"]
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda a: c.post("/generate", json={**body, "adapter": a}), order))
        assert [r.status_code for r in answers] == [200] * 6
        got = [r.json()["steered"]["text"] for r in answers]
        assert c.app_state["fsrl"].engine.slots.pager.page_ins >= 3
    want = {a: generate(client, adapter=a, **body)["steered"]["text"] for a in ("tiny",)}
    assert got[0] == got[3] == want["tiny"] and got[1] == got[4] == got[2] == got[5]  # b and c: same weights
    assert got[1] != got[0]


def test_a_load_beyond_the_adapter_memory_budget_is_409_naming_it(app_factory, default_engine):
    with app_factory(adapter_memory_gib=1e-9) as c:  # even the shipped one is over: skipped at start
        assert c.get("/adapters").json()["adapters"] == []
        error = assert_error(c.post("/adapters", json={"id": "b", "path": "more/tiny-b"}), 409, "--adapter-memory-gib")
        assert "GiB" in error["message"]


# --- loads that are refused -----------------------------------------------------------------------

def test_load_corrupt_adapter_is_400_naming_the_file(client):
    error = assert_error(client.post("/adapters", json={"id": "bad", "path": "corrupt"}), 400,
                         "adapter.safetensors")
    assert error["code"] == "corrupt_file"


def test_load_adapter_made_for_another_sae_is_400_naming_the_sae(client):
    error = assert_error(client.post("/adapters", json={"id": "bad", "path": "other-sae"}), 400, "SAE")
    assert error["code"] == "mismatch"


def test_load_adapter_with_a_malformed_adapter_json_is_400_naming_the_field(client, setup):
    r = client.post("/adapters", json={"id": "bad", "path": "bad-meta"})
    error = assert_error(r, 400, "bad-meta/adapter.json", "clamp_nonnegative")
    assert error["code"] == "corrupt_file" and str(setup.adapters_dir) not in r.text


def test_load_adapter_whose_file_links_outside_is_403(client):
    assert_error(client.post("/adapters", json={"id": "bad", "path": "link-out"}), 403,
                 "link-out/adapter.safetensors resolves outside")


def test_load_adapter_without_files_is_400(client):
    assert_error(client.post("/adapters", json={"id": "bad", "path": "no-meta"}), 400, "adapter.json")


@pytest.mark.parametrize("path", ["../outside/stray", "escape"], ids=["dotdot", "symlink"])
def test_load_adapter_outside_the_adapters_dir_is_403(client, path):
    assert_error(client.post("/adapters", json={"id": "bad", "path": path}), 403, "outside")


def test_load_adapter_from_an_unresolvable_path_is_403(client):
    assert_error(client.post("/adapters", json={"id": "bad", "path": "~no-such-user-here/x"}), 403,
                 "cannot be resolved")


def test_load_adapter_from_a_path_too_long_for_the_filesystem_is_400(client):  # found by fuzzing
    assert_error(client.post("/adapters", json={"id": "bad", "path": "0" * 3000}), 400, "too long")


def test_load_adapter_path_with_a_nul_byte_is_422(client):  # found by scripts/fuzz_api.py
    assert_error(client.post("/adapters", json={"id": "bad", "path": "a\u0000b"}), 422, "path")


def test_delete_unknown_adapter_is_404(client):
    assert_error(client.delete("/adapters/never-loaded"), 404)
