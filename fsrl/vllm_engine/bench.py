"""`fsrl bench --engine vllm`: decode throughput inside vLLM, stock against steered, side by side.

Two engines live at once on the same model: stock vLLM (its own architecture) and the steered
one (`fsrl.vllm_engine`, a bank of `--bank-slots` adapters). Each round runs every mode once,
in turn, and the median of `--repeats` rounds is kept, so drift on a shared machine hits every
mode alike. Modes:
  vanilla             stock vLLM
  steered, none       the steered engine, rows unsteered (what its buffers cost)
  adapter             every row steered by one adapter
  adapter+8           the adapter plus 8 feature overrides per row
  K=k adapters        rows spread over k distinct adapters (copies of one, in k bank slots;
                      at batch sizes of k rows or more)
  fsrl packed, ...    fsrl's own engine on the same prompts, in the same rounds, as `fsrl serve`
                      runs it on a CPU (weights packed for oneDNN): unsteered, adapter, adapter+8
On a CPU each bank slot in use runs once, on its own tokens (`RowAdapters.by_slot`), so the
cost of steering grows with the distinct adapters of a step (each one's weights are read once),
not with --bank-slots. Ratios are against vanilla at the same batch.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", default="adapters/concise", help="adapter folder (default: adapters/concise)")
    parser.add_argument("--batches", default="1,8", help="batch sizes (default 1,8)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bank-slots", type=int, default=4)
    parser.add_argument("--eager", action="store_true", help="enforce_eager (no compilation)")
    parser.add_argument("--out", default="bench-results/vllm-bench.json")


OVERRIDES = [(3, "set", 20.0), (10, "add", 10.0), (40, "ablate", 0.0), (41, "scale", 2.0),
             (50, "set", 0.0), (60, "unsteer", 0.0), (70, "add", -5.0), (80, "scale", 0.5)]
PROMPTS = ("Tell me about the moon.", "Give me three tips for sleeping better.", "What is a prime number?",
           "Write a haiku about rain.", "Explain how a bicycle works.", "What is inflation?",
           "How do plants grow?", "Describe a busy market.")


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from fsrl.corpus import chat_ids
    from fsrl.models import ensure_default_model
    from fsrl.sae import default_sae_dir, load_sae
    from fsrl.vllm_engine import kv_cache_bytes, steered_llm_kwargs, steering_extra_args

    model = str(ensure_default_model(progress=False))
    layer = load_sae(default_sae_dir()).info.layer
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = [chat_ids(tokenizer, p) for p in PROMPTS]
    batches = [int(b) for b in args.batches.split(",")]
    # The KV cache these batches need, not vLLM's default share of the machine's memory.
    kv = kv_cache_bytes(model, 4, 2 * max(batches) * 512)
    common = dict(model=model, dtype="float32", enforce_eager=args.eager, max_model_len=512,
                  max_num_seqs=max(batches), seed=0, enable_prefix_caching=False, kv_cache_memory_bytes=kv)
    t0 = time.perf_counter()
    stock = LLM(**common)
    start_stock = time.perf_counter() - t0
    t0 = time.perf_counter()
    steered = LLM(**{**common, **steered_llm_kwargs(str(default_sae_dir()), layer, adapters={"a0": args.adapter},
                                                    bank_slots=args.bank_slots)})
    start_steered = time.perf_counter() - t0
    for k in range(1, args.bank_slots):
        steered.collective_rpc("fsrl_load_adapter", args=(f"a{k}", args.adapter))

    def params(extra: dict | None) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True, extra_args=extra)

    def vllm_mode(llm, extra):
        def run_batch(batch: int) -> None:
            reqs = [{"prompt_token_ids": prompts[i % len(prompts)]} for i in range(batch)]
            llm.generate(reqs, [params(extra(i)) for i in range(batch)], use_tqdm=False)
        return run_batch

    modes = {"vanilla": vllm_mode(stock, lambda i: None), "steered, none": vllm_mode(steered, lambda i: None),
             "adapter": vllm_mode(steered, lambda i: steering_extra_args("a0")),
             "adapter+8": vllm_mode(steered, lambda i: steering_extra_args("a0", overrides=OVERRIDES))}
    for k in sorted({min(4, args.bank_slots), args.bank_slots} - {1}):
        modes[f"K={k} adapters"] = vllm_mode(steered, lambda i, k=k: steering_extra_args(f"a{i % k}"))
    modes.update(_fsrl_modes(model, args, prompts))
    times: dict[tuple[str, int], list[float]] = {}
    for batch in batches:
        for _ in range(args.repeats + 1):  # the first round warms up and is not kept
            for name, run_batch in modes.items():
                if name.startswith("K=") and batch < int(name[2:].split()[0]):
                    continue  # k adapters need k rows
                t = time.perf_counter()
                run_batch(batch)
                times.setdefault((name, batch), []).append(time.perf_counter() - t)
    rows = []
    for batch in batches:
        vanilla = batch * args.new_tokens / statistics.median(times[("vanilla", batch)][1:])
        for name in modes:
            if (name, batch) not in times:
                continue
            tok_s = batch * args.new_tokens / statistics.median(times[(name, batch)][1:])
            rows.append({"mode": name, "batch": batch, "tok_s": round(tok_s, 1), "ratio": round(tok_s / vanilla, 3)})
    print(f"\nvLLM {'eager' if args.eager else 'compiled'}, default model, fp32, {args.new_tokens} new tokens, "
          f"bank of {args.bank_slots}; engine start: stock {start_stock:.0f} s, steered {start_steered:.0f} s")
    print(f"{'mode':<32} {'batch':>5} {'tok/s':>8} {'/ vanilla':>9}")
    for r in rows:
        print(f"{r['mode']:<32} {r['batch']:>5} {r['tok_s']:>8.1f} {r['ratio']:>9.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"engine": "vllm", "compiled": not args.eager, "new_tokens": args.new_tokens,
                               "bank_slots": args.bank_slots, "repeats": args.repeats,
                               "start_s": {"stock": round(start_stock, 1), "steered": round(start_steered, 1)},
                               "machine": platform.platform(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def _fsrl_modes(model: str, args: argparse.Namespace, prompts: list[list[int]]) -> dict:
    """fsrl's own engine on the same prompts, steering and token counts, packed as `fsrl serve`
    runs it on a CPU."""
    from fsrl.adapter import load_adapter
    from fsrl.cpu_inference import can_pack, pack_linear_layers
    from fsrl.generation import GenerationRequest, Generator
    from fsrl.models import load_base_model
    from fsrl.overrides import FeatureOverride
    from fsrl.sae import default_sae_dir, load_sae
    from fsrl.sampling import SamplingParams as FsrlSampling
    from fsrl.steering import RowSteering

    base = load_base_model(model)
    sae = load_sae(default_sae_dir())
    layer = sae.info.layer
    adapter = load_adapter(args.adapter, sae=sae, layer=layer)
    if can_pack(base.model):
        pack_linear_layers(base.model)
        sae.pack_for_cpu()
        adapter.pack_for_cpu()
    generator = Generator(base, sae, layer)
    sampling = FsrlSampling(max_new_tokens=args.new_tokens, ignore_eos=True)
    overrides = [FeatureOverride(i, op, v) for i, op, v in OVERRIDES]
    modes = {}
    for mode, steering in (("none", RowSteering()), ("adapter", RowSteering(adapter)),
                           ("adapter+8", RowSteering(adapter, 1.0, overrides))):
        def run_batch(batch: int, steering=steering) -> None:
            generator.generate([GenerationRequest(prompts[i % len(prompts)], steering, sampling)
                                for i in range(batch)])
        modes[f"fsrl packed, {mode}"] = run_batch
    return modes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fsrl.vllm_engine.bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # vLLM starts processes
    raise SystemExit(main())
