"""Steering inside vLLM's compiled model, checked token for token against fsrl's own Generator
(fp32, greedy): unsteered, each adapter, clamps of every op, mixed rows in one batch, each case
alone, rows joining a running batch, and every case joining one engine at a random step.

    python -m fsrl.testing.vllm_check [--default] [--eager] [--tp 2] [--stock] [--json OUT]

Without --default: a tiny random Llama built on the spot (4 heads / 2 KV heads of 32: vLLM's
CPU attention takes no head size under 32), a top-k SAE and two adapters (`a` relu, `b`
soft-threshold clamped at zero). --default: the embedded default model, the shipped SAE and
the shipped adapters (`concise` stacked in the bank when the model is built, `bullets`
loaded after the engine has started). Needs vLLM and fsrl installed in one environment (the
plugin entry point `vllm.general_plugins: fsrl_steering` must be registered).

--stock: plain vLLM on the same model (no plugin architecture), unsteered only.
Prints one row per case: whether vLLM's tokens equal fsrl's, and whether the case's tokens
differ from unsteered ones (a steering that silently did nothing would not); then, per rank,
whether the compiled graph (not eager Python) ran the steering. Exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

LOGPROBS: list = []


@dataclass(frozen=True)
class CheckSetup:
    """What the check runs on: the adapter `first` is stacked in the bank when the model is
    built, `second` is loaded into it after the engine has started (and compiled)."""

    model: str
    sae: str
    layer: int
    first: tuple[str, str]     # (adapter id, folder)
    second: tuple[str, str]
    prompts: list[list[int]]
    new_tokens: int
    max_model_len: int
    clamp_scale: float = 1.0   # `set` and `add` values of the cases are multiplied by this


def tiny_setup(root: Path) -> CheckSetup:
    """Tiny model (hidden 128: head size 32), character tokenizer, top-k SAE at layer 1, two
    adapters: `a` (relu) and `b` (soft_threshold, clamps fused features at zero)."""
    from fsrl.adapter import save_adapter
    from fsrl.sae import save_sae
    from fsrl.testing import tiny_adapter, tiny_model, tiny_sae, tiny_tokenizer

    layer, hidden = 1, 128
    paths = {"model": root / "model", "sae": root / "sae", "a": root / "adapters" / "a",
             "b": root / "adapters" / "b"}
    if not (root / "done").exists():
        tiny_model(hidden=hidden).save_pretrained(paths["model"])
        tiny_tokenizer().save_pretrained(paths["model"])
        sae = tiny_sae(d_in=hidden, d_sae=256, layer=layer)
        save_sae(sae, paths["sae"])
        save_adapter(tiny_adapter(sae, adapter_id="a", layer=layer, seed=1), paths["a"])
        save_adapter(tiny_adapter(sae, adapter_id="b", layer=layer, seed=2, activation="soft_threshold",
                                  clamp_nonnegative=True), paths["b"])
        (root / "done").write_text("ok")
    prompts = [[1] + [3 + (7 * i + j) % 95 for j in range(5 + 3 * i)] for i in range(4)]
    return CheckSetup(str(paths["model"]), str(paths["sae"]), layer, ("a", str(paths["a"])),
                 ("b", str(paths["b"])), prompts, new_tokens=16, max_model_len=256)


DEFAULT_PROMPTS = ("Tell me about the moon.", "Give me three tips for sleeping better.",
                   "What is a prime number?", "Write a haiku about rain.")


def default_setup(adapters_dir: Path) -> CheckSetup:
    """The embedded default model, the shipped SAE and the shipped adapters."""
    from transformers import AutoTokenizer

    from fsrl.corpus import chat_ids
    from fsrl.models import ensure_default_model
    from fsrl.sae import default_sae_dir, load_sae

    model = ensure_default_model(progress=False)
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = [chat_ids(tokenizer, text) for text in DEFAULT_PROMPTS]
    layer = load_sae(default_sae_dir()).info.layer
    # Its residual stream at the SAE's layer is ~150 in norm: a clamp of 8 moves no token.
    return CheckSetup(str(model), str(default_sae_dir()), layer, ("concise", str(adapters_dir / "concise")),
                 ("bullets", str(adapters_dir / "bullets")), prompts, new_tokens=24, max_model_len=512,
                 clamp_scale=10.0)


# name -> (prompt index, steering: adapter role ("first"/"second"), scale, overrides,
# steer_from ("prompt": from the first generated token))
CASES = {
    "unsteered": (0, None),
    "first adapter": (0, dict(adapter="first", scale=1.0)),
    "first adapter, from generated": (0, dict(adapter="first", scale=2.0, steer_from="prompt")),
    "second adapter (loaded late)": (1, dict(adapter="second", scale=1.5)),
    "clamp set/ablate (no adapter)": (2, dict(overrides=[(3, "set", 8.0), (10, "set", 5.0), (40, "ablate", 0.0)])),
    "first + add/scale/unsteer": (3, dict(adapter="first", scale=1.0,
                                          overrides=[(5, "add", 4.0), (7, "scale", 3.0), (11, "unsteer", 0.0)])),
    "second + set": (2, dict(adapter="second", scale=1.0, overrides=[(20, "set", 6.0)])),
    "scale 0 (noop)": (1, dict(adapter="first", scale=0.0)),
}


def _adapter_id(setup: CheckSetup, spec: dict) -> str | None:
    role = spec.get("adapter")
    return None if role is None else getattr(setup, role)[0]


def _overrides(setup: CheckSetup, spec: dict) -> list[tuple[int, str, float]]:
    return [(i, op, v * setup.clamp_scale if op in ("set", "add") else v) for i, op, v in spec.get("overrides", ())]


def fsrl_reference(setup: CheckSetup) -> dict[str, list[int]]:
    """Each case's tokens from fsrl's Generator, one row at a time (rows are independent)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from fsrl.adapter import load_adapter
    from fsrl.generation import GenerationRequest, Generator
    from fsrl.models import BaseModel, model_fingerprint
    from fsrl.overrides import FeatureOverride
    from fsrl.sae import load_sae
    from fsrl.sampling import SamplingParams
    from fsrl.steering import RowSteering

    model = LlamaForCausalLM.from_pretrained(setup.model, dtype=torch.float32).eval()
    base = BaseModel(model=model, tokenizer=AutoTokenizer.from_pretrained(setup.model),
                     name="check", fingerprint=model_fingerprint(model))
    sae = load_sae(setup.sae)
    adapters = {a_id: load_adapter(folder, sae=sae, layer=setup.layer) for a_id, folder in (setup.first, setup.second)}
    gen = Generator(base, sae, setup.layer)
    sampling = SamplingParams(max_new_tokens=setup.new_tokens, temperature=0.0, ignore_eos=True)
    out = {}
    for name, (p, spec) in CASES.items():
        steering = RowSteering()
        if spec is not None:
            a_id = _adapter_id(setup, spec)
            steering = RowSteering(adapter=adapters[a_id] if a_id else None, scale=spec.get("scale", 1.0),
                                   steer_from=len(setup.prompts[p]) if spec.get("steer_from") == "prompt" else 0,
                                   overrides=tuple(FeatureOverride(i, op, v) for i, op, v in _overrides(setup, spec)))
        out[name] = gen.generate([GenerationRequest(setup.prompts[p], steering=steering, sampling=sampling)])[0].token_ids
    for p, prompt in enumerate(setup.prompts):  # unsteered tokens of every prompt (the silent-no-op check)
        out[f"unsteered prompt {p}"] = gen.generate([GenerationRequest(prompt, sampling=sampling)])[0].token_ids
    return out


def vllm_tokens(setup: CheckSetup, eager: bool, tp: int, steered: bool, drop_steering: bool = False,
                also_drop: bool = False) -> tuple[dict[str, list[int]], float, float, list, dict[str, list[int]]]:
    """Every case in one `generate` call (one batch), then each case alone, then rows joining a
    running batch; start time, the batch's wall time, each rank's counters, and (`also_drop`)
    the batch once more on the same engine with every request sent unsteered."""
    from vllm import LLM, SamplingParams

    from fsrl.overrides import FeatureOverride
    from fsrl.vllm_plugin import kv_cache_bytes, steered_llm_kwargs, steering_extra_args

    extra = steered_llm_kwargs(setup.model, setup.sae, setup.layer, adapters=dict([setup.first])) if steered else {}
    # The cache 16 requests of max_model_len need, not vLLM's default share of the machine's memory.
    kv = kv_cache_bytes(setup.model, 4, 16 * setup.max_model_len)
    t0 = time.perf_counter()
    llm = LLM(model=setup.model, dtype="float32", enforce_eager=eager, max_model_len=setup.max_model_len,
              max_num_seqs=16, max_num_batched_tokens=max(256, setup.max_model_len), seed=0,
              kv_cache_memory_bytes=kv,
              tensor_parallel_size=tp, distributed_executor_backend="mp" if tp > 1 else None, **extra)
    start_s = time.perf_counter() - t0
    if steered:
        llm.collective_rpc("fsrl_load_adapter", args=setup.second)
        llm.collective_rpc("fsrl_page", args=([], [setup.second[0]]))
        print(f"adapter {setup.second[0]} loaded and paged into the bank")

    def params(p: int, spec: dict | None, logprobs: int | None = None, drop: bool = drop_steering) -> SamplingParams:
        args = None
        if spec is not None and steered and not drop:
            steer_from = len(setup.prompts[p]) if spec.get("steer_from") == "prompt" else 0
            args = steering_extra_args(_adapter_id(setup, spec), spec.get("scale", 1.0),
                                       [FeatureOverride(*o) for o in _overrides(setup, spec)], steer_from)
        return SamplingParams(temperature=0.0, max_tokens=setup.new_tokens, ignore_eos=True, extra_args=args,
                              logprobs=logprobs)

    def prompt(p: int) -> dict:
        return {"prompt_token_ids": setup.prompts[p]}

    names = list(CASES) if steered else ["unsteered"]
    n_prompts = len(setup.prompts)
    reqs = [prompt(CASES[n][0]) for n in names] + [prompt(p) for p in range(n_prompts)]
    sps = [params(*CASES[n]) for n in names] + [params(p, None, logprobs=3) for p in range(n_prompts)]
    t1 = time.perf_counter()
    outs = llm.generate(reqs, sps, use_tqdm=False)
    batch_s = time.perf_counter() - t1
    got = {n: list(o.outputs[0].token_ids) for n, o in zip(names, outs)}
    got.update({f"unsteered prompt {p}": list(o.outputs[0].token_ids) for p, o in enumerate(outs[len(names):])})
    # The unsteered rows' top-3 log-probabilities, as floats: compare two runs' JSON files
    # (stock vLLM and the steered model) for bit-for-bit equality of untouched rows.
    LOGPROBS.extend([[{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]
                     for o in outs[len(names):]])
    if steered:  # each steered case alone too (a batch of one)
        for n in names:
            got[f"{n} [alone]"] = list(llm.generate([prompt(CASES[n][0])], [params(*CASES[n])],
                                                    use_tqdm=False)[0].outputs[0].token_ids)
        # rows joining a running batch: two requests added after 3 decode steps of a first
        engine = llm.llm_engine
        first, second = CASES["first adapter"], CASES["second + set"]
        got.update(run_joins(engine, [
            (0, "first adapter [joined by 2 at step 3]", prompt(first[0]), params(*first)),
            (3, "unsteered prompt 1 [joins at step 3]", prompt(1), params(1, None)),
            (3, "second + set [joins at step 3]", prompt(second[0]), params(*second))]))
        got.update(join_at_random(engine, names, n_prompts, prompt, params))
    counters = llm.collective_rpc("fsrl_counters") if steered else []
    dropped = {}
    if also_drop:  # after the counters: these steps steer nothing
        outs = llm.generate(reqs, [params(*CASES[n], drop=True) for n in names] + sps[len(names):], use_tqdm=False)
        dropped = {n: list(o.outputs[0].token_ids) for n, o in zip(names, outs)}
    return got, start_s, batch_s, counters, dropped


def run_joins(engine, joins: list[tuple[int, str, dict, Any]], max_steps: int = 1000) -> dict[str, list[int]]:
    """Run one engine, adding each (step, name, prompt, params) at its step (several may join
    in one step, some after others have finished); each name's tokens. Bounded in steps."""
    pending = sorted(joins, key=lambda join: join[0])
    finished: dict[str, list[int]] = {}
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and not engine.has_unfinished_requests():
            step = max(step, pending[0][0])  # nothing running: `step()` would wait for ever
        while pending and pending[0][0] <= step:
            _, name, request_prompt, request_params = pending.pop(0)
            engine.add_request(name, request_prompt, request_params)
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = list(out.outputs[0].token_ids)
        step += 1
        if step > max_steps:  # greedy rows of a few tokens end long before
            raise RuntimeError(f"rows joining a running engine did not finish: {len(finished)} of {len(joins)}")
    return finished


def join_at_random(engine, names: list[str], n_prompts: int, prompt, params, seed: int = 0,
                   last_step: int = 10) -> dict[str, list[int]]:
    """Every case and every prompt unsteered, in a shuffled order, each added at a random step
    in [0, last_step] of one running engine: rows joining at random must still give each
    case's own tokens."""
    import random

    rng = random.Random(seed)
    entries = [(n, CASES[n][0], CASES[n]) for n in names] + \
              [(f"unsteered prompt {p}", p, (p, None)) for p in range(n_prompts)]
    rng.shuffle(entries)
    return run_joins(engine, [(rng.randint(0, last_step), f"{name} [joins at random, seed {seed}]",
                               prompt(p), params(*case)) for name, p, case in entries])


def report(got: dict, ref: dict, counters: list, eager: bool) -> tuple[list[str], int]:
    """The table's lines and the number of failures."""
    lines = [f"{'case':<54} {'tokens == fsrl':<15} {'!= unsteered':<13} first tokens (vLLM)"]
    failures = 0
    for name, tokens in got.items():
        base = name.split(" [")[0]
        equal = tokens == ref[base]
        p, spec = CASES[base] if base in CASES else (None, None)
        should_differ = spec is not None and not (spec.get("scale", 1.0) == 0.0 and not spec.get("overrides"))
        differs = p is not None and tokens != ref[f"unsteered prompt {p}"]
        ok = equal and (differs or not should_differ)
        failures += not ok
        mark = ("yes" if differs else "no") if p is not None else "-"
        if should_differ and not differs:
            mark += " (FAIL: silent)"
        lines.append(f"{name:<54} {'yes' if equal else 'NO':<15} {mark:<13} {tokens[:8]}")
        if not equal:
            lines += [f"{'':<54} fsrl: {ref[base][:24]}", f"{'':<54} vLLM: {tokens[:24]}"]
    for rank, c in enumerate(counters):
        # Compiled: the site's Python never ran (the graph did the steering). Eager: every step.
        ok = c["steps"] > 0 and (c["eager_site_forwards"] >= c["steps"] if eager else c["eager_site_forwards"] == 0)
        failures += not ok
        lines.append(f"rank {rank}: {c['steps']} steps with buffers written, steering site's Python ran "
                     f"{c['eager_site_forwards']} times outside a compiled graph: {'ok' if ok else 'FAIL'}")
    lines.append(f"{len(got) + len(counters) - failures} passed, {failures} failed")
    return lines, failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fsrl.testing.vllm_check", description=__doc__.splitlines()[0])
    ap.add_argument("--default", action="store_true", help="the default model, SAE and shipped adapters")
    ap.add_argument("--adapters-dir", type=Path, default=Path("adapters"), help="with --default (default: adapters)")
    ap.add_argument("--root", type=Path, default=Path("/tmp/fsrl-vllm-check"), help="where the tiny setup is written")
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no compilation)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks")
    ap.add_argument("--stock", action="store_true", help="plain vLLM (no steering architecture)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--drop-steering", action="store_true",
                    help="send every request unsteered: the check must then fail (it proves it can)")
    ap.add_argument("--also-drop", action="store_true",
                    help="after the check, the batch again on the same engine with every request unsteered, "
                         "reported apart (`dropped_failures`): the check's own proof that it can fail")
    args = ap.parse_args(argv)
    setup = default_setup(args.adapters_dir) if args.default else tiny_setup(args.root)
    ref = fsrl_reference(setup)
    got, start_s, batch_s, counters, dropped = vllm_tokens(setup, args.eager, args.tp, steered=not args.stock,
                                                           drop_steering=args.drop_steering, also_drop=args.also_drop)
    mode = (f"{'default model' if args.default else 'tiny model'}, {'eager' if args.eager else 'compiled'}, "
            f"tp={args.tp}, {'stock vLLM' if args.stock else 'steered model'}")
    lines, failures = report(got, ref, counters, args.eager)
    print(f"\nvLLM {mode}: engine start {start_s:.1f} s, one batch of {len(got)} requests {batch_s:.2f} s")
    print("\n".join(lines))
    extra = {}
    if args.also_drop:  # the same comparison must fail every steered case of the dropped run
        dropped_lines, dropped_failures = report(dropped, ref, [], args.eager)
        print("\nthe same batch with every request sent unsteered (the check must fail on it):")
        print("\n".join(dropped_lines))
        extra = {"dropped": dropped, "dropped_failures": dropped_failures, "dropped_table": dropped_lines}
    if args.json:
        args.json.write_text(json.dumps({"mode": mode, "start_s": start_s, "batch_s": batch_s, "counters": counters,
                                         "logprobs": LOGPROBS, "got": got, "ref": ref, "failures": failures, **extra}))
    return 1 if failures else 0


if __name__ == "__main__":  # vLLM starts processes: this guard keeps them from re-running the check
    sys.exit(main())
