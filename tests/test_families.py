"""Any transformers causal LM, steered exactly where its SAE reads.

For tiny random models of each family in `fsrl.testing.TINY_FAMILIES` and an SAE whose hook
name is `blocks.2.hook_resid_pre` (the input of layer 2) or `blocks.2.hook_resid_post` (its
output), the prompt's log-probabilities under a set / add / ablate clamp equal a reference
written here: a plain transformers forward with a hook of this file's own at the SAE's site
(resid_pre of 2 is read at the output of layer 1, the same tensor by definition) and the
steering formula in float64. Each case also checks that the clamp moves the answer and that
the other site would have given another answer, so a site off by one cannot pass.
"""

from __future__ import annotations

import json

import pytest
import torch

from fsrl.generation import GenerationRequest, Generator
from fsrl.models import BaseModel, model_fingerprint
from fsrl.overrides import FeatureOverride
from fsrl.sae import SAE_CFG_FILE, Sae, load_sae, random_sae, save_sae
from fsrl.sampling import SamplingParams
from fsrl.steering import RowSteering
from fsrl.testing import TINY_FAMILIES, tiny_family_model, tiny_tokenizer

LAYER = 2
TOL = 1e-4        # float32 model against a float64 steering reference
PROMPT = [1, 40, 41, 42, 50, 60, 43, 44, 70, 45, 46, 47]
# Where each family keeps its decoder layers (written here, apart from fsrl.models).
LAYERS_AT = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}


def decoder_blocks(model) -> torch.nn.ModuleList:
    obj = model
    for part in LAYERS_AT.get(model.config.model_type, "model.layers").split("."):
        obj = getattr(obj, part)
    return obj


def write_sae_at(folder, hook_name: str, d_in: int = 64) -> Sae:
    """A random top-k SAE saved in sae-lens's format with `hook_name`, read back by fsrl."""
    sae = random_sae(d_in, 128, architecture="topk", k=8, layer=LAYER, seed=3)
    save_sae(sae, folder)
    cfg = json.loads((folder / SAE_CFG_FILE).read_text())
    cfg["metadata"]["hook_name"] = hook_name
    (folder / SAE_CFG_FILE).write_text(json.dumps(cfg))
    return load_sae(folder)


def reference_prompt_logprobs(model, sae: Sae, read_at: int, ids: list[int],
                              overrides: list[FeatureOverride]) -> torch.Tensor:
    """log p(token t+1 | ..t) for the prompt, with the clamp applied to the output of decoder
    layer `read_at` by the steering formula of docs/api.md in float64."""
    W_enc, b_enc, W_dec, b_dec = (t.double() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))

    def clamp(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        x = hidden.double()
        pre = (x - b_dec) @ W_enc + b_enc
        top = pre.topk(sae.k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        d = torch.zeros_like(f)
        for o in overrides:
            d[..., o.index] = {"set": o.value - f[..., o.index], "add": torch.full_like(f[..., o.index], o.value),
                               "ablate": -f[..., o.index]}[o.op]
        steered = (x + d @ W_dec).to(hidden.dtype)
        return (steered, *output[1:]) if isinstance(output, tuple) else steered

    handle = decoder_blocks(model)[read_at].register_forward_hook(clamp) if overrides else None
    try:
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    finally:
        if handle is not None:
            handle.remove()
    return logp[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def fsrl_prompt_logprobs(generator: Generator, ids: list[int], overrides: list[FeatureOverride]) -> torch.Tensor:
    """What fsrl's engine path reports (`/v1/completions` echo + logprobs reads the same)."""
    request = GenerationRequest(ids, RowSteering(overrides=tuple(overrides)),
                                SamplingParams(max_new_tokens=1), prompt_logprobs=0)
    result = generator.generate([request])[0]
    return torch.tensor([lp for lp, _ in result.prompt_logprobs], dtype=torch.float64)


@pytest.fixture(scope="module", params=sorted(TINY_FAMILIES))
def family_model(request):
    model = tiny_family_model(request.param)
    return BaseModel(model=model, tokenizer=tiny_tokenizer(), name=f"tiny-{request.param}",
                     fingerprint=model_fingerprint(model))


@pytest.mark.parametrize("kind", ["resid_pre", "resid_post"])
def test_a_clamp_equals_a_plain_transformers_hook_at_the_saes_own_site(family_model, kind, tmp_path):
    sae = write_sae_at(tmp_path, f"blocks.{LAYER}.hook_{kind}")
    read_at = LAYER - 1 if kind == "resid_pre" else LAYER
    other = LAYER if kind == "resid_pre" else LAYER - 1
    # Ablate the feature that fires most over the prompt, so the ablation does something.
    x = family_model.activations(sae.site_at(), torch.tensor([PROMPT]))[0]
    busiest = int(sae.encode(x[1:]).sum(0).argmax())
    set_at, add_at = [i for i in (5, 17, 29) if i != busiest][:2]
    overrides = [FeatureOverride(set_at, "set", 6.0), FeatureOverride(add_at, "add", 3.0),
                 FeatureOverride(busiest, "ablate")]

    generator = Generator(family_model, sae)
    got = fsrl_prompt_logprobs(generator, PROMPT, overrides)
    want = reference_prompt_logprobs(family_model.model, sae, read_at, PROMPT, overrides)
    base = reference_prompt_logprobs(family_model.model, sae, read_at, PROMPT, [])
    elsewhere = reference_prompt_logprobs(family_model.model, sae, other, PROMPT, overrides)

    assert generator.site.hook_name == f"blocks.{LAYER}.hook_{kind}"
    assert (got - want).abs().max() < TOL
    assert (want - base).abs().max() > 100 * TOL, "the clamp must change the answer"
    assert (elsewhere - want).abs().max() > 100 * TOL, "the other site must give another answer"


def test_unsteered_requests_are_the_plain_model_on_every_family(family_model, tmp_path):
    sae = write_sae_at(tmp_path, f"blocks.{LAYER}.hook_resid_pre")
    got = fsrl_prompt_logprobs(Generator(family_model, sae), PROMPT, [])
    want = reference_prompt_logprobs(family_model.model, sae, LAYER - 1, PROMPT, [])
    assert (got - want).abs().max() < TOL


def test_a_gemma2_folder_loads_with_its_attention_logit_cap(tmp_path):
    """transformers' SDPA attention leaves Gemma 2's attn_logit_softcapping out; fsrl loads such
    a model on the eager path, which keeps it (as vLLM does)."""
    from transformers import AutoModelForCausalLM

    from fsrl.models import load_base_model

    tiny_family_model("gemma2").save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    capped = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    uncapped = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        want, other = capped(ids).logits, uncapped(ids).logits
        got = load_base_model(str(tmp_path), device="cpu").model(ids).logits
    assert (want - other).abs().max() > 1e-3  # the cap matters on this model
    assert torch.allclose(got, want, atol=1e-5)
