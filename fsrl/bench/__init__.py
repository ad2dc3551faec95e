"""`fsrl bench`: decode throughput, base against steered, measured side by side.

Modes, each on the same prompts and the same generation loop:
  base          no steering (the hook returns at once)
  adapter       every row steered by one adapter
  adapter+8     the adapter plus 8 feature overrides per row (set/add/scale/ablate...)

Runs are interleaved (base, adapter, adapter+8, base, ...) and the median of the repeats is
kept, so drift on a shared machine hits every mode alike. Ratios are steered/base tok/s.
On a CPU the default model is measured twice: as loaded, then with its linear weights, the
SAE and the adapter packed for oneDNN (`fsrl.cpu_inference`, what `fsrl serve` does on a CPU).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from fsrl.bench.loop import measure_rows
from fsrl.bench.shapes import RANDOM_SHAPES, calibration_activations, random_model, synthetic_adapter

MODES = ("base", "adapter", "adapter+8")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--model", default=None, help="model (default: the embedded default)")
    parser.add_argument("--sae", default=None, help="SAE folder (default: the shipped default SAE)")
    parser.add_argument("--adapter", default=None,
                        help="adapter folder; default: a synthetic adapter with --adapter-l0 active features")
    parser.add_argument("--adapter-l0", type=int, default=128,
                        help="active features per token of the synthetic adapter")
    parser.add_argument("--batch-sizes", default=None, help="default 1,8 (16,64 with --bank-kernel)")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="tokens per row (default: 64, or 32 per request with --serving)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--random-shapes", nargs="?", const="llama-1.2b", default=None,
                        choices=sorted(RANDOM_SHAPES),
                        help="also a random-weight shape: llama-1.2b (Llama-3.2-1B's, SAE 16k; "
                             "meant for a GPU, the default), gemma2-2b (Gemma-2-2B's, SAE 16k at "
                             "layer 12) or tiny (a dry run)")
    parser.add_argument("--no-default-model", action="store_true",
                        help="skip the default model (a GPU machine without it measures "
                             "--random-shapes alone)")
    parser.add_argument("--out", default=None,
                        help="JSON output path (default: bench-results/bench.json, or "
                             "bench-results/bench-serving.json with --serving)")
    engine = parser.add_argument_group("--engine vllm: steering inside vLLM (needs `make vllm`)")
    engine.add_argument("--engine", choices=["fsrl", "vllm"], default="fsrl",
                        help="vllm: stock vLLM against the steered vLLM model, side by side, on "
                             "the default model with --adapter (default adapters/concise); with "
                             "--serving: `fsrl serve --engine vllm` beside the default engine")
    engine.add_argument("--bank-slots", type=int, default=None,
                        help="adapters stacked in the steered model's bank (default 4; 64 with "
                             "--bank-kernel; on a CPU only the slots in use run)")
    bank = parser.add_argument_group("--bank-kernel: the adapter bank's product alone")
    bank.add_argument("--bank-kernel", action="store_true",
                      help="the bank product (grouped by slot) against every slot on every token, "
                           "for 1, 4, 16, 64 distinct adapters at each batch size (default 16,64), "
                           "on the --random-shapes size (default llama-1.2b)")
    bank.add_argument("--calls", type=int, default=50, help="--bank-kernel: calls per timing")
    parser.add_argument("--adapters", action="store_true",
                        help="throughput against distinct adapters per batch (1, 4, 16, 64; default "
                             "batches 16,64) beside the batch unsteered; with --engine vllm, vLLM's bench "
                             "with 64 bank slots")
    parser.add_argument("--loaded", default=None, metavar="N,N,...",
                        help="with --adapters: over HTTP instead, one server per count of adapters "
                             "loaded (e.g. 1,16,256; 16 device slots, a batch using up to 16), on --engine")
    serving = parser.add_argument_group("--serving: the HTTP server under concurrent clients")
    serving.add_argument("--serving", action="store_true",
                         help="benchmark `fsrl serve` end to end instead of the generation loop")
    serving.add_argument("--clients", default="1,4,8,16", help="concurrency levels")
    serving.add_argument("--adapters-dir", default="adapters", help="adapters the requests mix")
    serving.add_argument("--max-batch-rows", type=int, default=16)
    parser.add_argument("--pack-cpu-weights", action=argparse.BooleanOptionalAction, default=None,
                        help="CPU: weights packed for oneDNN, as `fsrl serve` does by default. "
                             "Left out: the loop bench measures the default model both "
                             "ways; --serving serves packed")


def _overrides(sae) -> list:
    from fsrl.overrides import FeatureOverride

    ops = ["set", "add", "scale", "ablate", "unsteer", "set", "add", "scale"]
    step = sae.d_sae // 8
    return [FeatureOverride(i * step + 3, op, 4.0 if op != "scale" else 2.0) for i, op in enumerate(ops)]


def measure(generator, adapter, overrides, batch: int, prompt_tokens: int, new_tokens: int,
            repeats: int, sync) -> dict[str, float]:
    """Median tok/s of each mode (base, adapter, adapter+8 on every row), measured interleaved."""
    from fsrl.steering import RowSteering

    steering = {"base": RowSteering(), "adapter": RowSteering(adapter),
                "adapter+8": RowSteering(adapter, 1.0, overrides)}
    return measure_rows(generator, {m: [steering[m]] * batch for m in MODES}, prompt_tokens, new_tokens,
                        repeats, sync)


def _bench_setup(label, base, sae, layer, adapter, args, sync, rows: list[dict]) -> None:
    from fsrl.generation import Generator

    generator = Generator(base, sae, layer)
    overrides = _overrides(sae)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    try:
        for batch in batches:
            tps = measure(generator, adapter, overrides, batch, args.prompt_tokens, args.new_tokens,
                          args.repeats, sync)
            row = {"setup": label, "device": str(base.device), "batch": batch,
                   **{f"{m} tok/s": round(v, 2) for m, v in tps.items()},
                   "adapter/base": round(tps["adapter"] / tps["base"], 3),
                   "adapter+8/base": round(tps["adapter+8"] / tps["base"], 3)}
            rows.append(row)
            print(_format_row(row), flush=True)
    finally:
        generator.hook.remove()


COLUMNS = ["setup", "device", "batch", "base tok/s", "adapter tok/s", "adapter+8 tok/s",
           "adapter/base", "adapter+8/base"]


def _format_row(row: dict) -> str:
    return " | ".join(str(row.get(c, "")) for c in COLUMNS)


def run(args: argparse.Namespace) -> int:
    if args.bank_kernel:
        from fsrl.bench.bank import run_bank

        args.bank_slots, args.batch_sizes = args.bank_slots or 64, args.batch_sizes or "16,64"
        return run_bank(args)
    if args.adapters:
        from fsrl.bench.adapters import run_adapters, run_loaded

        args.batch_sizes, args.new_tokens = args.batch_sizes or "16,64", args.new_tokens or 32
        if args.loaded:
            return run_loaded(args)
        if args.engine != "vllm":
            return run_adapters(args)
        # vLLM's side of the curve: its bench with 64 bank slots, rows over K = 4, 16, 64 of them
        args.bank_slots = args.bank_slots or 64
    args.bank_slots, args.batch_sizes = args.bank_slots or 4, args.batch_sizes or "1,8"
    if args.engine == "vllm":
        import importlib.util

        from fsrl.errors import FsrlError

        if importlib.util.find_spec("vllm") is None:
            raise FsrlError("--engine vllm needs vLLM installed in this environment (`make vllm`)")
    if args.engine == "vllm" and not args.serving:
        from fsrl.bench import vllm as vllm_bench

        args.out = args.out or "bench-results/vllm-bench.json"
        args.new_tokens = args.new_tokens or 64
        args.adapter = args.adapter or "adapters/concise"
        args.batches, args.eager = args.batch_sizes, False
        return vllm_bench.run(args)
    if args.serving:
        from fsrl.bench import serving as bench_serving

        args.out = args.out or "bench-results/bench-serving.json"
        args.new_tokens = args.new_tokens or 32
        return bench_serving.run(args)
    args.out = args.out or "bench-results/bench.json"
    args.new_tokens = args.new_tokens or 64
    import torch

    from fsrl.adapter import load_adapter
    from fsrl.cpu_inference import can_pack, pack_linear_layers
    from fsrl.models import load_base_model, resolve_device
    from fsrl.sae import default_sae_dir, load_sae

    device = resolve_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows: list[dict] = []
    print(" | ".join(COLUMNS))
    if not args.no_default_model:
        base = load_base_model(args.model, device=device)
        sae = load_sae(args.sae or default_sae_dir(), device=device, dtype=base.dtype)
        layer = sae.info.layer if sae.info.layer is not None else len(base.layers) // 2
        if args.adapter:
            adapter = load_adapter(args.adapter, sae=sae, layer=layer, device=device, dtype=base.dtype)
        else:
            adapter = synthetic_adapter(sae, base, layer, args.adapter_l0, calibration_activations(base, sae.site_at(layer)))
        packing = [False, True] if args.pack_cpu_weights is None else [args.pack_cpu_weights]
        for packed in (packing if can_pack(base.model) else [False]):
            if packed:  # packing replaces the model's layers in place
                pack_linear_layers(base.model)
                sae.pack_for_cpu()  # and the steering's own products, as `fsrl serve` does
                adapter.pack_for_cpu()
            _bench_setup(f"{base.name} + SAE {sae.d_sae}{', packed weights' if packed else ''}", base, sae,
                         layer, adapter, args, sync, rows)
        del base

    if args.random_shapes:
        big, big_sae, big_adapter, layer = random_model(args.random_shapes, device, args.adapter_l0)
        label = f"random {args.random_shapes} + SAE {big_sae.d_sae}"
        _bench_setup(label, big, big_sae, layer, big_adapter, args, sync, rows)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name() if device.type == "cuda" else None},
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0
