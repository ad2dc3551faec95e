"""Prompt log-probabilities and greedy tokens of the steered model on vLLM, for cases a caller
wrote to disk (tests/test_vllm_families.py): each case a transformers folder, an SAE folder and
one clamp. Runs in a process of its own (vLLM starts processes that must not re-run a caller's
module), one engine per case, one after another.

    python -m fsrl.testing.vllm_families CASES.json OUT.json [--compiled]

CASES.json: [{"name", "model", "sae", "prompt": [ids], "overrides": [[index, op, value]],
"max_tokens"}]. OUT.json: {name: {"prompt_logprobs": [...], "tokens": [...], "start_s"}}.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def run_case(case: dict, compiled: bool) -> dict:
    from vllm import LLM, SamplingParams

    from fsrl.overrides import FeatureOverride
    from fsrl.sae import load_sae
    from fsrl.vllm_plugin import kv_cache_bytes, steered_llm_kwargs, steering_extra_args

    sae = load_sae(case["sae"])
    t0 = time.perf_counter()
    llm = LLM(model=case["model"], dtype="float32", enforce_eager=not compiled, max_model_len=128,
              max_num_seqs=4, max_num_batched_tokens=256, seed=0,
              kv_cache_memory_bytes=kv_cache_bytes(case["model"], 4, 4 * 128),
              **steered_llm_kwargs(case["model"], case["sae"], sae.site_at().layer))
    start_s = time.perf_counter() - t0
    try:
        params = SamplingParams(temperature=0.0, max_tokens=case["max_tokens"], prompt_logprobs=0,
                                ignore_eos=True,
                                extra_args=steering_extra_args(overrides=[FeatureOverride(*o) for o in case["overrides"]]))
        out = llm.generate([{"prompt_token_ids": case["prompt"]}], params, use_tqdm=False)[0]
        prompt = case["prompt"]
        logprobs = [out.prompt_logprobs[t][prompt[t]].logprob for t in range(1, len(prompt))]
        return {"prompt_logprobs": logprobs, "tokens": list(out.outputs[0].token_ids), "start_s": start_s}
    finally:
        llm.llm_engine.engine_core.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m fsrl.testing.vllm_families")
    parser.add_argument("cases", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--compiled", action="store_true", help="compile (default: enforce_eager)")
    args = parser.parse_args()
    # The engine core in this process, not one of its own: a start takes ~2 s instead of ~15 s
    # here, and the steering is the same (measured: equal log-probabilities either way).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    results = {case["name"]: run_case(case, args.compiled) for case in json.loads(args.cases.read_text())}
    args.out.write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
