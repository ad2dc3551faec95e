"""Adapter pushes in a batch of 16 rows holding K distinct adapters: each adapter over every row,
then masked (before), against each adapter over its own rows only (`fsrl.steering` now), side
by side in one run, on the default SAE's shapes with copies of the shipped `concise` adapter.
Times `fsrl.steering.steer` alone (decode step: 1 token per row; prefill: 32). Prints a table
and writes bench-results/adapter_groups.json.

    python scripts/bench_adapter_groups.py [--ks 1,4,16] [--repeats 200]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from fsrl import steering
from fsrl.adapter import load_adapter
from fsrl.sae import default_sae_dir, load_sae
from fsrl.steering import RowSteering, SteeringBatch, steer


def masked_pushes(xs, batch, d_sae, keep_v):
    """The method before: every distinct adapter over every row, then masked to its rows."""
    B, T, _ = xs.shape
    d = xs.new_zeros(B, T, d_sae)
    for slot, adapter in enumerate(batch.adapters):
        in_slot = batch.adapter_slot == slot
        v = adapter(xs).to(xs.dtype)
        d = d + torch.where(in_slot[:, None, None], batch.scale[:, None, None] * v, 0.0)
    return d, None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="1,4,16")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", default="bench-results/adapter_groups.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    sae = load_sae(default_sae_dir(), dtype=torch.float32)  # as the server holds it on a CPU
    base_adapter = load_adapter("adapters/concise", sae=sae)
    grouped = steering._adapter_pushes
    rows = []
    for tokens in (1, 32):
        x = torch.randn(16, tokens, sae.d_in) * 20
        positions = torch.arange(tokens).expand(16, tokens)
        for k in (int(v) for v in args.ks.split(",")):
            adapters = [copy.deepcopy(base_adapter) for _ in range(k)]
            batch = SteeringBatch.build([RowSteering(adapters[b % k]) for b in range(16)], sae.d_sae)
            times = {"masked": [], "grouped": []}
            with torch.inference_mode():
                for _ in range(args.repeats):
                    for name, impl in (("masked", masked_pushes), ("grouped", grouped)):
                        steering._adapter_pushes = impl
                        start = time.perf_counter()
                        steer(x, sae, batch, positions)
                        times[name].append(time.perf_counter() - start)
            steering._adapter_pushes = grouped
            masked, grouped_ms = (statistics.median(times[n]) * 1e3 for n in ("masked", "grouped"))
            rows.append({"tokens_per_row": tokens, "distinct_adapters": k, "masked_ms": round(masked, 3),
                         "grouped_ms": round(grouped_ms, 3), "ratio": round(masked / grouped_ms, 2)})
    print(f"{'tokens/row':>10} {'K':>3} {'every row, masked (ms)':>23} {'own rows (ms)':>14} {'ratio':>6}")
    for r in rows:
        print(f"{r['tokens_per_row']:>10} {r['distinct_adapters']:>3} {r['masked_ms']:>23} {r['grouped_ms']:>14} {r['ratio']:>6}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "torch_threads": torch.get_num_threads()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
