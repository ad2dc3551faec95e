"""What the benchmarks build on: random-weight model shapes and a synthetic adapter (`fsrl bench`,
`fsrl bench --engine vllm`, the serving bench's setup in fsrl.testing)."""

from __future__ import annotations

# Random-weight model shapes: the config's fields (model_type picks the family) and the SAE's
# width and hook layer.
RANDOM_SHAPES = {
    "llama-1.2b": ({"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256},
                   16384, 8),
    # Head size 32: the smallest vLLM's CPU attention takes (`--engine vllm --random-shapes tiny`).
    # The paper's model, Gemma-2-2B, with a 16k SAE at layer 12 (Gemma Scope's middle layer).
    "gemma2-2b": ({"model_type": "gemma2", "hidden_size": 2304, "intermediate_size": 9216,
                   "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
                   "head_dim": 256, "query_pre_attn_scalar": 256, "vocab_size": 256000}, 16384, 12),
    "tiny": ({"model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}, 256, 1),
}


def synthetic_adapter(sae, base, layer: int, l0: int, calibration, seed: int = 0):
    """A random relu adapter whose bias is set so that about `l0` features fire per token."""
    import torch

    from fsrl.adapter import new_adapter

    adapter = new_adapter("bench-synthetic", sae, base.name, base.fingerprint, layer,
                          init_std=0.0, seed=seed).to(base.device, sae.W_dec.dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        adapter.W.copy_((torch.randn(sae.d_in, sae.d_sae, generator=g) / sae.d_in ** 0.5).to(adapter.W))
        z = (calibration - adapter.b_in) @ adapter.W                      # (N, d_sae)
        # Per-feature bias: feature j fires on about l0/d_sae of the calibration tokens.
        quantile = 1.0 - l0 / sae.d_sae
        adapter.b.copy_(-torch.quantile(z.float(), quantile, dim=0).to(adapter.b) + 1e-3)
    return adapter.requires_grad_(False)


def calibration_activations(base, site, n_tokens: int = 256):
    """The residual at `site` over random tokens: what `synthetic_adapter` sets its bias on."""
    import torch

    ids = torch.randint(10, base.model.config.vocab_size - 10, (1, n_tokens),
                        generator=torch.Generator().manual_seed(0))
    return base.activations(site, ids)[0, 1:]                          # drop position 0


def random_model(shape_name: str, device, adapter_l0: int) -> tuple:
    """A random-weight model of RANDOM_SHAPES[shape_name] on `device` (bf16 on CUDA, fp32
    elsewhere) with a tokenizer that decodes nothing, a random top-k SAE and a synthetic adapter
    with about `adapter_l0` features firing: (BaseModel, Sae, adapter, layer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fsrl.models import BaseModel, model_fingerprint
    from fsrl.sae import random_sae

    shape, d_sae, layer = RANDOM_SHAPES[shape_name]
    fields = dict(shape)
    cfg = AutoConfig.for_model(fields.pop("model_type"), **fields, max_position_embeddings=4096,
                               tie_word_embeddings=True)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg).to(dtype).eval().requires_grad_(False)
    tokenizer = type("Tok", (), {"eos_token_id": None, "pad_token_id": 0,
                                 "decode": staticmethod(lambda ids, **k: "")})()
    base = BaseModel(model=model, tokenizer=tokenizer, name=f"random-{shape_name}",
                     fingerprint=model_fingerprint(model))
    sae = random_sae(cfg.hidden_size, d_sae, "topk", k=64, layer=layer).to(device, dtype)
    adapter = synthetic_adapter(sae, base, layer, min(adapter_l0, d_sae // 4), calibration_activations(base, sae.site_at(layer)))
    return base, sae, adapter, layer
