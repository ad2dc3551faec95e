"""`fsrl bench --engine vllm`: decode throughput inside vLLM, stock against steered, side by side.

Two engines live at once on the same model (the default one, or with --random-shapes a
random-weight Llama written to a temporary folder with a random SAE and a synthetic adapter:
bf16 on CUDA, what `make gpu-check` measures): stock vLLM (its own architecture) and the steered
one (`fsrl.vllm_plugin`, a bank of `--bank-slots` adapters). Each round runs every mode once,
in turn, and the median of `--repeats` rounds is kept, so drift on a shared machine hits every
mode alike. Modes:
  vanilla             stock vLLM
  steered, none       the steered engine, rows unsteered (what its buffers cost)
  adapter             every row steered by one adapter
  adapter+8           the adapter plus 8 feature overrides per row
  K=k adapters        rows spread over k distinct adapters (copies of one, in k bank slots;
                      at batch sizes of k rows or more)
  fsrl packed, ...    fsrl's own engine on the same weights and prompts, in the same rounds, as
                      `fsrl serve` runs it (on a CPU packed for oneDNN; "fsrl eager" elsewhere):
                      unsteered, adapter, adapter+8
On a CPU each bank slot in use runs once, on its own tokens (`RowAdapters.by_slot`), so the
cost of steering grows with the distinct adapters of a step (each one's weights are read once),
not with --bank-slots. Ratios are against vanilla at the same batch.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", default="adapters/concise", help="adapter folder (default: adapters/concise)")
    parser.add_argument("--batches", default="1,8", help="batch sizes (default 1,8)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bank-slots", type=int, default=4)
    parser.add_argument("--eager", action="store_true", help="enforce_eager (no compilation)")
    parser.add_argument("--random-shapes", default=None, choices=["llama-1.2b", "gemma2-2b", "tiny"],
                        help="a random-weight Llama instead of the default model (fsrl bench's shapes)")
    parser.add_argument("--device", default="auto", help="fsrl's side and the random weights: auto | cpu | cuda")
    parser.add_argument("--adapter-l0", type=int, default=128, help="--random-shapes: the synthetic adapter's L0")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="--random-shapes: prompt length")
    parser.add_argument("--out", default="bench-results/vllm-bench.json")


OVERRIDES = [(3, "set", 20.0), (10, "add", 10.0), (40, "ablate", 0.0), (41, "scale", 2.0),
             (50, "set", 0.0), (60, "unsteer", 0.0), (70, "add", -5.0), (80, "scale", 0.5)]
PROMPTS = ("Tell me about the moon.", "Give me three tips for sleeping better.", "What is a prime number?",
           "Write a haiku about rain.", "Explain how a bicycle works.", "What is inflation?",
           "How do plants grow?", "Describe a busy market.")


@dataclass
class BenchSetup:
    """What both engines serve: a model folder, an SAE, the adapter copied into every bank slot,
    the prompts (token ids) and fsrl's own engine on the same weights."""
    model: str
    sae_dir: str
    layer: int
    adapter: str
    dtype: str                  # vLLM's name for it
    prompts: list[list[int]]
    label: str
    load_fsrl: Callable[[], tuple]   # -> (BaseModel, Sae, adapter), on fsrl's side
    vllm_kwargs: dict = field(default_factory=dict)


def default_setup(args: argparse.Namespace) -> BenchSetup:
    """The embedded default model in fp32, its SAE, `--adapter`, chat prompts."""
    from transformers import AutoTokenizer

    from fsrl.adapter import load_adapter
    from fsrl.corpus import chat_ids
    from fsrl.models import ensure_default_model, load_base_model
    from fsrl.sae import default_sae_dir, load_sae

    model = str(ensure_default_model(progress=False))
    layer = load_sae(default_sae_dir()).info.layer
    tokenizer = AutoTokenizer.from_pretrained(model)

    def load_fsrl() -> tuple:
        sae = load_sae(default_sae_dir())
        return load_base_model(model), sae, load_adapter(args.adapter, sae=sae, layer=layer)

    return BenchSetup(model, str(default_sae_dir()), layer, args.adapter, "float32",
                      [chat_ids(tokenizer, p) for p in PROMPTS], "default model, fp32", load_fsrl)


def random_setup(args: argparse.Namespace, root: Path) -> BenchSetup:
    """A random-weight Llama of `--random-shapes` (bf16 on CUDA, fp32 on a CPU), a random top-k SAE
    and a synthetic adapter with about `--adapter-l0` features firing, written under `root`;
    random prompts, no tokenizer (vLLM skips detokenising)."""
    import torch

    from fsrl.adapter import save_adapter
    from fsrl.bench.shapes import random_model
    from fsrl.models import resolve_device
    from fsrl.sae import save_sae

    base, sae, adapter, layer = random_model(args.random_shapes, resolve_device(args.device), args.adapter_l0)
    dtype, vocab = base.dtype, base.model.config.vocab_size
    base.model.save_pretrained(root / "model")
    save_sae(sae, root / "sae")
    save_adapter(adapter, root / "adapter")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, vocab - 10, (args.prompt_tokens,), generator=g).tolist()
               for _ in PROMPTS]
    return BenchSetup(str(root / "model"), str(root / "sae"), layer, str(root / "adapter"),
                      "bfloat16" if dtype == torch.bfloat16 else "float32", prompts,
                      f"random {args.random_shapes} + SAE {sae.d_sae}, {str(dtype).removeprefix('torch.')}",
                      lambda: (base, sae, adapter), vllm_kwargs={"skip_tokenizer_init": True})


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="fsrl-vllm-bench-") as tmp:
        setup = random_setup(args, Path(tmp)) if args.random_shapes else default_setup(args)
        return _run(args, setup)


def _run(args: argparse.Namespace, setup: BenchSetup) -> int:
    from fsrl.vllm_plugin import kv_cache_bytes

    batches = [int(b) for b in args.batches.split(",")]
    # The KV cache these batches need, not vLLM's default share of the machine's memory.
    dtype_bytes = 2 if setup.dtype == "bfloat16" else 4
    kv = kv_cache_bytes(setup.model, dtype_bytes, 2 * max(batches) * 512)
    common = dict(model=setup.model, dtype=setup.dtype, enforce_eager=args.eager, max_model_len=512,
                  max_num_seqs=max(batches), seed=0, enable_prefix_caching=False, kv_cache_memory_bytes=kv,
                  **setup.vllm_kwargs)
    engines: list = []
    try:
        return _measure(args, setup, common, engines)
    finally:  # engines left to the interpreter's exit can hang it (seen with --random-shapes)
        for llm in engines:
            llm.llm_engine.engine_core.shutdown()


def _measure(args: argparse.Namespace, setup: BenchSetup, common: dict, engines: list) -> int:
    """Both engines started (each appended to `engines` for the caller to shut down), every mode
    timed, the table printed and the JSON written."""
    from vllm import LLM, SamplingParams

    from fsrl.overrides import FeatureOverride
    from fsrl.vllm_plugin import steered_llm_kwargs, steering_extra_args

    prompts = setup.prompts
    batches = [int(b) for b in args.batches.split(",")]
    t0 = time.perf_counter()
    stock = LLM(**common)
    engines.append(stock)
    start_stock = time.perf_counter() - t0
    t0 = time.perf_counter()
    steered = LLM(**{**common, **steered_llm_kwargs(setup.model, setup.sae_dir, setup.layer, adapters={"a0": setup.adapter},
                                                    bank_slots=args.bank_slots)})
    engines.append(steered)
    start_steered = time.perf_counter() - t0
    for k in range(1, args.bank_slots):
        steered.collective_rpc("fsrl_load_adapter", args=(f"a{k}", setup.adapter))
        steered.collective_rpc("fsrl_page", args=([], [f"a{k}"]))

    def params(extra: dict | None) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True, extra_args=extra,
                              detokenize="skip_tokenizer_init" not in setup.vllm_kwargs)

    def vllm_mode(llm, extra):
        def run_batch(batch: int) -> None:
            reqs = [{"prompt_token_ids": prompts[i % len(prompts)]} for i in range(batch)]
            llm.generate(reqs, [params(extra(i)) for i in range(batch)], use_tqdm=False)
        return run_batch

    modes = {"vanilla": vllm_mode(stock, lambda i: None), "steered, none": vllm_mode(steered, lambda i: None),
             "adapter": vllm_mode(steered, lambda i: steering_extra_args("a0")),
             "adapter+8": vllm_mode(steered, lambda i: steering_extra_args("a0", overrides=[FeatureOverride(*o) for o in OVERRIDES]))}
    for k in sorted(({k for k in (4, 16, 64) if k < args.bank_slots} | {args.bank_slots}) - {1}):
        modes[f"K={k} adapters"] = vllm_mode(steered, lambda i, k=k: steering_extra_args(f"a{i % k}"))
    modes.update(_fsrl_modes(setup, args))
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
    print(f"\nvLLM {'eager' if args.eager else 'compiled'}, {setup.label}, {args.new_tokens} new tokens, "
          f"bank of {args.bank_slots}; engine start: stock {start_stock:.0f} s, steered {start_steered:.0f} s")
    print(f"{'mode':<32} {'batch':>5} {'tok/s':>8} {'/ vanilla':>9}")
    for r in rows:
        print(f"{r['mode']:<32} {r['batch']:>5} {r['tok_s']:>8.1f} {r['ratio']:>9.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"engine": "vllm", "setup": setup.label, "compiled": not args.eager,
                               "new_tokens": args.new_tokens,
                               "bank_slots": args.bank_slots, "repeats": args.repeats,
                               "start_s": {"stock": round(start_stock, 1), "steered": round(start_steered, 1)},
                               "machine": platform.platform(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def _fsrl_modes(setup: BenchSetup, args: argparse.Namespace) -> dict:
    """fsrl's own engine on the same weights, prompts, steering and token counts, as `fsrl serve`
    runs it (on a CPU with the weights packed for oneDNN)."""
    from fsrl.cpu_inference import can_pack, pack_linear_layers
    from fsrl.generation import GenerationRequest, Generator
    from fsrl.overrides import FeatureOverride
    from fsrl.sampling import SamplingParams as FsrlSampling
    from fsrl.steering import RowSteering

    base, sae, adapter = setup.load_fsrl()
    packed = can_pack(base.model)
    if packed:
        pack_linear_layers(base.model)
        sae.pack_for_cpu()
        adapter.pack_for_cpu()
    generator = Generator(base, sae, setup.layer)
    sampling = FsrlSampling(max_new_tokens=args.new_tokens, ignore_eos=True)
    overrides = [FeatureOverride(i, op, v) for i, op, v in OVERRIDES]
    prompts = setup.prompts
    label = "fsrl packed" if packed else "fsrl eager"
    modes = {}
    for mode, steering in (("none", RowSteering()), ("adapter", RowSteering(adapter)),
                           ("adapter+8", RowSteering(adapter, 1.0, overrides))):
        def run_batch(batch: int, steering=steering) -> None:
            generator.generate([GenerationRequest(prompts[i % len(prompts)], steering, sampling)
                                for i in range(batch)])
        modes[f"{label}, {mode}"] = run_batch
    return modes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fsrl.bench.vllm", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # vLLM starts processes
    raise SystemExit(main())
