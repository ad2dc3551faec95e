"""`--engine vllm` on every family it steers (fsrl.vllm_plugin.STEERABLE_ARCHITECTURES), at
both sites: tiny random models of each family (heads of 32, which vLLM's CPU attention takes)
with an SAE at `blocks.2.hook_resid_pre` or `..._post` and one clamp. vLLM's prompt
log-probabilities equal the plain transformers reference of tests/test_families.py (a hook
written there, at the SAE's site), and its greedy tokens equal fsrl's default engine."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from fsrl.generation import GenerationRequest, Generator
from fsrl.overrides import FeatureOverride
from fsrl.sampling import SamplingParams
from fsrl.steering import RowSteering
from fsrl.testing import tiny_family_model, tiny_tokenizer
from test_families import LAYER, PROMPT, reference_prompt_logprobs, write_sae_at

import _prefetch

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                 reason="vLLM is not installed (`make vllm`; `make test` installs it)")]

FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
KINDS = ("resid_pre", "resid_post")
OVERRIDES = [FeatureOverride(5, "set", 6.0), FeatureOverride(17, "add", 3.0)]
NEW_TOKENS = 8
TOL = 2e-4


def write_cases(root: Path) -> None:
    """Every (family, site) case written under `root`, listed in `root/cases.json` (what
    `python -m fsrl.testing.vllm_families` reads; tests/_prefetch.py calls this)."""
    written = []
    for family in FAMILIES:
        model = tiny_family_model(family, hidden=128)
        model_dir = root / family
        model.save_pretrained(model_dir)
        tiny_tokenizer().save_pretrained(model_dir)
        for kind in KINDS:
            sae_dir = root / f"{family}-{kind}-sae"
            sae_dir.mkdir()
            write_sae_at(sae_dir, f"blocks.{LAYER}.hook_{kind}", d_in=128)
            written.append({"name": f"{family} {kind}", "model": str(model_dir), "sae": str(sae_dir),
                            "prompt": PROMPT, "overrides": [[o.index, o.op, o.value] for o in OVERRIDES],
                            "max_tokens": NEW_TOKENS})
    (root / "cases.json").write_text(json.dumps(written))


@pytest.fixture(scope="module")
def cases():
    """Every (family, site) case written to disk, and vLLM's answers to all of them (one
    subprocess, one engine per case; run in the background from the session's start:
    tests/_prefetch.py)."""
    done = _prefetch.result("vllm families")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    written = {case["name"]: case for case in _prefetch.json_of(done, "cases.json")}
    return written, _prefetch.json_of(done, "out.json")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_vllm_steers_each_family_exactly_at_the_saes_site(cases, family, kind):
    written, answers = cases
    case, got = written[f"{family} {kind}"], answers[f"{family} {kind}"]
    from transformers import AutoModelForCausalLM

    from fsrl.models import load_base_model
    from fsrl.sae import load_sae

    # The reference on transformers' eager attention: its SDPA path leaves Gemma 2's logit cap out.
    model = AutoModelForCausalLM.from_pretrained(case["model"], dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    sae = load_sae(case["sae"])
    read_at = LAYER - 1 if kind == "resid_pre" else LAYER
    want = reference_prompt_logprobs(model, sae, read_at, PROMPT, OVERRIDES)
    base = reference_prompt_logprobs(model, sae, read_at, PROMPT, [])
    vllm_logprobs = torch.tensor(got["prompt_logprobs"], dtype=torch.float64)
    assert (vllm_logprobs - want).abs().max() < TOL
    assert (want - base).abs().max() > 100 * TOL, "the clamp must change the answer"

    base_model = load_base_model(case["model"], device="cpu")  # fsrl's default engine, as it loads a folder
    request = GenerationRequest(PROMPT, RowSteering(overrides=tuple(OVERRIDES)),
                                SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    assert got["tokens"] == Generator(base_model, sae).generate([request])[0].token_ids


def test_a_family_vllm_is_not_steered_on_is_one_line(tmp_path):
    from fsrl.errors import FsrlError
    from fsrl.vllm_plugin import model_architecture

    model = tiny_family_model("gpt2")
    model.save_pretrained(tmp_path)
    with pytest.raises(FsrlError) as err:
        model_architecture(tmp_path)
    assert "GPT2LMHeadModel" in str(err.value) and "\n" not in str(err.value)
