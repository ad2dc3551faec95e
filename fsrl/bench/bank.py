"""`fsrl bench --bank-kernel`: the adapter bank's product (`fsrl.adapter.slot_matmul`, what vLLM's
steering site runs for every token) with the kernel the device gets, against every slot on every
token, for K distinct adapters among the tokens of one decode step.

The bank holds `--bank-slots` adapters (64 by default here) of a `--random-shapes` size (Llama-3.2-
1B's: d_in 2048, SAE 16,384 features, in bfloat16 on a GPU). Each step's N tokens (a batch of N
rows decoding) are spread over K slots in turn. Both kernels run the same inputs, interleaved, and
the median of the repeats is kept. On CUDA each kernel is captured in a CUDA graph and replayed
(vLLM replays its decode steps so), so the figures are device time without launch overhead.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from fsrl.bench.shapes import RANDOM_SHAPES

DISTINCT = (1, 4, 16, 64)


def _timer(device):
    import torch

    if device.type != "cuda":
        return lambda fn, calls: _cpu_time(fn, calls)

    def cuda_time(fn, calls: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e3 / calls
    return cuda_time


def _cpu_time(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) * 1e6 / calls


def _captured(fn, device):
    """fn as a replay of a CUDA graph of it (on CUDA), or fn itself."""
    import torch

    if device.type != "cuda":
        return fn
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up outside the graph (cuBLAS workspaces, autotuning)
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def run_bank(args: argparse.Namespace) -> int:
    import torch

    from fsrl.adapter import every_slot_matmul, grouped_mm_fits, slot_matmul

    device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape_name = args.random_shapes or "llama-1.2b"
    shape, d_sae, _ = RANDOM_SHAPES[shape_name]
    d_in, slots = shape["hidden_size"], args.bank_slots
    torch.manual_seed(0)
    W = torch.randn(slots, d_in, d_sae, device=device, dtype=dtype) * d_in ** -0.5
    kernel = ("grouped GEMM (sorted by slot on the device)" if grouped_mm_fits(W[0], W) else
              "host-grouped (one product per slot in use)" if device.type == "cpu" else "every slot")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    timer, calls = _timer(device), args.calls
    rows = []
    print(f"bank of {slots} slots, {d_in} x {d_sae} each, {dtype}, {device}; kernel: {kernel}")
    print("batch | distinct | slot_matmul us | every slot us | every slot / slot_matmul | max abs diff")
    for batch in batches:
        x = torch.randn(batch, d_in, device=device, dtype=dtype)
        for distinct in [k for k in DISTINCT if k <= min(batch, slots)]:
            slot = (torch.arange(batch) % distinct).to(device)
            out = {}
            modes = {"slot_matmul": lambda: out.__setitem__("slot_matmul", slot_matmul(x, W, slot)),
                     "every_slot": lambda: out.__setitem__("every_slot", every_slot_matmul(x, W, slot))}
            runs = {name: _captured(fn, device) for name, fn in modes.items()}
            samples: dict[str, list[float]] = {name: [] for name in runs}
            for rep in range(args.repeats + 1):  # the first round warms up and is dropped
                for name, run in runs.items():
                    t = timer(run, calls)
                    if rep:
                        samples[name].append(t)
            us = {name: statistics.median(v) for name, v in samples.items()}
            diff = float((out["slot_matmul"].float() - out["every_slot"].float()).abs().max())
            row = {"batch": batch, "distinct": distinct, "slot_matmul_us": round(us["slot_matmul"], 1),
                   "every_slot_us": round(us["every_slot"], 1),
                   "speedup": round(us["every_slot"] / us["slot_matmul"], 2), "max_abs_diff": diff}
            rows.append(row)
            print(" | ".join(str(v) for v in row.values()), flush=True)
            del runs
    result = {"bench": "bank-kernel", "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
              "torch": torch.__version__, "shape": shape_name, "d_in": d_in, "d_sae": d_sae, "dtype": str(dtype),
              "bank_slots": slots, "kernel": kernel, "calls": calls, "repeats": args.repeats,
              "cuda_graphs": device.type == "cuda", "rows": rows}
    out_path = Path(args.out or "bench-results/bench-bank.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2))
    print(f"wrote {out_path}")
    return 0
