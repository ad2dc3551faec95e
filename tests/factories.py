"""Tiny random models, tokenizers, SAEs and adapters for fast CPU tests."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from fsrl.adapter import FsrlAdapter, new_adapter
from fsrl.models import BaseModel, model_fingerprint
from fsrl.sae import Sae, random_sae

CHARS = string.printable  # 100 characters, one token each


def tiny_tokenizer():
    """A character-level fast tokenizer with a chat template, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    for ch in CHARS:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant: {% endif %}")
    return fast


def tiny_model(n_layers: int = 4, hidden: int = 64, vocab: int = 104, seed: int = 0,
               dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=True, initializer_range=0.3)
    model = LlamaForCausalLM(cfg).to(dtype).eval().requires_grad_(False)
    return model


def tiny_base(seed: int = 0, **kwargs) -> BaseModel:
    model = tiny_model(seed=seed, **kwargs)
    return BaseModel(model=model, tokenizer=tiny_tokenizer(), name="tiny-llama",
                     fingerprint=model_fingerprint(model))


def tiny_sae(d_in: int = 64, d_sae: int = 256, architecture: str = "topk", layer: int = 1,
             seed: int = 0) -> Sae:
    return random_sae(d_in, d_sae, architecture=architecture, k=16, layer=layer, seed=seed)


def tiny_adapter(sae: Sae, base: BaseModel | None = None, adapter_id: str = "tiny",
                 activation: str = "relu", clamp_nonnegative: bool = False, seed: int = 1,
                 layer: int = 1) -> FsrlAdapter:
    """An adapter with weights large enough to push a sparse set of features."""
    adapter = new_adapter(adapter_id, sae, base.name if base else "tiny-llama",
                          base.fingerprint if base else "0", layer=layer, activation=activation,
                          clamp_nonnegative=clamp_nonnegative, init_std=0.0, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        adapter.W.copy_(torch.randn(sae.d_in, sae.d_sae, generator=g) * 0.3)
        adapter.b.copy_(torch.randn(sae.d_sae, generator=g) * 0.5 - 1.5)
        adapter.tau.fill_(0.5)
    return adapter.requires_grad_(False)


def tiny_pairs(path: Path, n: int = 24) -> Path:
    """Preference pairs a tiny model can pick up: chosen answers say "yes!", rejected "no."."""
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"prompt": f"q{i} {'abc' * (i % 4)}?", "chosen": "yes! " * (1 + i % 3),
                                 "rejected": "no. " * (1 + (i + 1) % 3)}) + "\n")
    return path
