"""A row's sampling parameters, as data (no torch: the HTTP edge reads the bounds too)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # OpenAI's (and vLLM's): before choosing a token, its logit loses presence_penalty if this
    # row has already generated it, and frequency_penalty times the number of times it has.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


# Below this temperature a row decodes greedily: logits / t would overflow float32.
MIN_TEMPERATURE = 1e-5
