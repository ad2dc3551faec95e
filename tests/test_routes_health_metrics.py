"""/health and /metrics of the tiny server (the app `fsrl serve` runs, with its lifespan,
under uvicorn in a test thread, and again on `fsrl serve --engine vllm`), the state a CPU server starts with, and the answer to a route that does not exist."""

from __future__ import annotations

import _server_fixtures as fixtures
from _server_fixtures import assert_error, generate

# Fixtures the server's test files share: pytest finds them by these names.
# Both engines (`engine`); tests that need the default engine's process take `default_engine`.
engine, default_engine = fixtures.engine, fixtures.default_engine
setup, app_factory, client = fixtures.engine_setup, fixtures.app_factory, fixtures.engine_client


def test_health_reports_model_sae_site_device_and_adapter_count(client, setup, engine):
    r = client.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "worker": "running", "model": setup.model_dir.name,
                        "sae": "random-topk-256", "layer": 1, "site": "blocks.1.hook_resid_post",
                        "sae_hook_name": "model.layers.1", "device": "cpu", "packed_cpu_weights": engine == "default",
                        "compiled_decode": engine == "vllm", "engine": "transformers" if engine == "default" else "vllm",
                        "model_runner": "transformers eager" if engine == "default" else "vLLM V1 model runner",
                        "adapters": 1}


def test_a_cpu_server_packs_its_model_sae_and_adapters(setup, default_engine):
    from torch import nn

    from fsrl.cpu_inference import PackedLinear
    from server.settings import Settings
    from server.state import load_state

    state = load_state(Settings(model=str(setup.model_dir), sae=setup.sae_dir,
                                adapters_dir=setup.adapters_dir, device="cpu", pack_cpu_weights=True))
    try:
        assert state.packed_cpu_weights
        assert all(type(m) is not nn.Linear for m in state.base.model.modules())
        assert any(isinstance(m, PackedLinear) for m in state.base.model.modules())
        assert state.sae.packed_encoder is not None
        assert state.registry.get("tiny").packed is not None
    finally:
        state.close()


def test_metrics_count_requests_tokens_and_queue_depth(client):
    generate(client, prompt="hi", adapter="tiny", max_new_tokens=3, ignore_eos=True)
    client.get("/not/a/route")
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    lines = r.text.splitlines()
    assert any(l.startswith('fsrl_requests_total{method="POST",route="/generate",status="200"}') for l in lines)
    assert any(l.startswith('fsrl_requests_total{method="GET",route="unmatched",status="404"}') for l in lines)
    assert any(l.startswith('fsrl_adapter_requests_total{adapter="tiny"}') for l in lines)
    assert any(l.startswith('fsrl_generated_tokens_total{output="steered"}') for l in lines)
    assert "fsrl_queue_depth 0.0" in lines and any(l.startswith("fsrl_time_to_first_token_seconds_count") for l in lines)


def test_unknown_route_is_404_in_the_error_shape(client):
    assert_error(client.get("/no/such/route"), 404, "/no/such/route")
