"""What a generation request asks for, as plain data: the one shape both HTTP edges (the
/generate schema and the OpenAI schemas) produce and `serving` consumes. No pydantic, no
torch: the edge depends on this module, never on the engine."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fsrl.overrides import Condition, FeatureOverride

ADAPTER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # an adapter's id, and its folder's name
ROWS = ("steered", "base")  # /generate: row 0 of a job is the steered output, row 1 (compare) the base


Prompt = str | tuple[int, ...]  # text, or token ids as they are


@dataclass(frozen=True)
class GenerateParams:
    prompt: str | None = None
    messages: tuple[dict[str, Any], ...] | None = None
    prompts: tuple[Prompt, ...] = ()      # /v1/completions: several prompts, text or token ids
    adapter: str | None = None
    steering_scale: float = 1.0
    features: tuple[FeatureOverride, ...] = ()
    abort_when: tuple[Condition, ...] = ()  # a row stops at the first generated position one passes
    telemetry: bool = False               # each steered token carries what the steering did there
    steer_positions: str = "all"          # "all" | "generated"
    max_new_tokens: int | None = 64       # None: as many as fit, up to the server's cap
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    presence_penalty: float = 0.0         # OpenAI's: off a generated token's logit once it has appeared
    frequency_penalty: float = 0.0        # ... and this much per time it has appeared
    seed: int | None = None               # None: the server picks one and reports it
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    compare: bool = False
    return_features: int = 0
    n: int = 1                            # rows per prompt; row j samples with seed + j
    logprobs: int | None = None           # per generated token: its log-probability and top k
    echo: bool = False                    # prompt tokens too (their log-probabilities with logprobs)
