"""`fsrl bench --adapters`: decode throughput against the number of distinct adapters in one batch.

On fsrl's own engine (the generation loop `fsrl serve` runs; on a CPU with the weights packed as
the server packs them): a batch of B rows, row i steered by adapter i mod K, for K = 1, 4, 16,
64 (K <= B), beside the same batch unsteered (stock), all in the same rounds, interleaved,
median of the repeats. The adapters are synthetic relu adapters of the SAE's size (about
`--adapter-l0` features firing a token), each with its own weights. The vLLM engine's side of
the curve is `fsrl bench --engine vllm --bank-slots K` (its "K=... adapters" rows).

With `--loaded 1,16,256`: the same question over HTTP against adapters loaded. One `fsrl serve`
(on `--engine`: fsrl's own or vLLM, compiled, with prompts and answers capped so that its KV
cache stays small) per count L (the default model, `--adapter-slots 16`, each loading L adapters: a copy of
`--adapter` and links to it under other ids, each loaded as its own version in memory), all started first and then
taking turns round by round; each round sends every batch size's worth of concurrent requests
(`--batch-sizes`), request i naming adapter i mod min(L, 16), so a batch uses 16 adapters
whatever L is, and the same requests unsteered on the first server (stock). Loopback only; the
servers are stopped by their PIDs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from pathlib import Path

DISTINCT = (1, 4, 16, 64)


def run_adapters(args: argparse.Namespace) -> int:
    import torch

    from fsrl.bench.shapes import calibration_activations, random_model, synthetic_adapter
    from fsrl.cpu_inference import can_pack, pack_linear_layers
    from fsrl.bench.loop import measure_rows
    from fsrl.generation import Generator
    from fsrl.models import load_base_model, resolve_device
    from fsrl.sae import default_sae_dir, load_sae
    from fsrl.steering import RowSteering

    device = resolve_device(args.device)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    most = max(k for k in DISTINCT if k <= max(batches))
    if args.random_shapes:
        base, sae, _, layer = random_model(args.random_shapes, device, args.adapter_l0)
        label = f"random {args.random_shapes} + SAE {sae.d_sae}"
    else:
        base = load_base_model(args.model, device=device)
        sae = load_sae(args.sae or default_sae_dir(), device=device, dtype=base.dtype)
        layer = sae.info.layer if sae.info.layer is not None else len(base.layers) // 2
        label = f"{base.name} + SAE {sae.d_sae}"
    calibration = calibration_activations(base, sae.site_at(layer))
    adapters = [synthetic_adapter(sae, base, layer, args.adapter_l0, calibration, seed=k) for k in range(most)]
    packed = device.type == "cpu" and can_pack(base.model) and args.pack_cpu_weights is not False
    if packed:  # as `fsrl serve` runs on a CPU
        pack_linear_layers(base.model)
        sae.pack_for_cpu()
        for adapter in adapters:
            adapter.pack_for_cpu()
    generator = Generator(base, sae, layer)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    print(f"{label}{', packed weights' if packed else ''}; {args.new_tokens} new tokens a row")
    print("batch | distinct adapters | tok/s | / stock | / one adapter")
    try:
        for batch in batches:
            modes = {"stock": [RowSteering() for _ in range(batch)]}
            for k in [k for k in DISTINCT if k <= batch]:
                modes[f"K={k}"] = [RowSteering(adapters[i % k]) for i in range(batch)]
            tps = measure_rows(generator, modes, args.prompt_tokens, args.new_tokens, args.repeats, sync)
            for mode, value in tps.items():
                row = {"setup": label, "batch": batch, "distinct": 0 if mode == "stock" else int(mode[2:]),
                       "tok_s": round(value, 2), "ratio_to_stock": round(value / tps["stock"], 3),
                       "ratio_to_one_adapter": None if mode == "stock" else round(value / tps["K=1"], 3)}
                rows.append(row)
                print(f"{batch} | {row['distinct'] or 'stock'} | {row['tok_s']} | {row['ratio_to_stock']} | "
                      f"{row['ratio_to_one_adapter'] if row['ratio_to_one_adapter'] is not None else ''}", flush=True)
    finally:
        generator.hook.remove()
    out_path = Path(args.out or "bench-results/bench-adapters.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({
        "bench": "adapters", "engine": "fsrl", "setup": label, "device": str(device), "packed": packed,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch_threads": torch.get_num_threads()},
        "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens, "repeats": args.repeats,
        "adapter_l0": args.adapter_l0, "rows": rows}, indent=2))
    print(f"wrote {out_path}")
    return 0


async def _round(url: str, batch: int, adapters: int | None, new_tokens: int) -> float:
    """Tokens per second of `batch` concurrent requests (adapter i mod `adapters`, or none)."""
    import logging

    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    bodies = [{"prompt": f"Question {i}: how do tides work?", "max_new_tokens": new_tokens, "ignore_eos": True,
               "seed": i, **({"adapter": f"a{i % adapters:03d}"} if adapters else {})} for i in range(batch)]
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        started = time.perf_counter()
        answers = await asyncio.gather(*(client.post("/generate", json=b) for b in bodies))
        elapsed = time.perf_counter() - started
    for r in answers:
        r.raise_for_status()
    return sum(r.json()["steered"]["completion_tokens"] for r in answers) / elapsed


def run_loaded(args: argparse.Namespace) -> int:
    """`--loaded`: throughput against adapters loaded, over HTTP (see the module's docstring)."""
    import os
    import shutil
    import tempfile

    from fsrl.errors import FsrlError
    from fsrl.testing.server_process import ServerProcess

    counts = [int(n) for n in args.loaded.split(",")]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    source = Path(args.adapter or "adapters/concise").resolve()
    if not (source / "adapter.json").is_file():
        raise FsrlError(f"no adapter at {source} (--adapter)")
    slots, used = 16, {n: min(n, 16) for n in counts}
    servers: dict[int, ServerProcess] = {}
    samples: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="fsrl-bench-loaded-") as tmp:
        try:
            for n in counts:
                folder = Path(tmp) / f"loaded-{n}"
                shutil.copytree(source, folder / "a000")
                for k in range(1, n):  # links inside the adapters directory, as the registry requires
                    (folder / f"a{k:03d}").symlink_to(folder / "a000")
                extra = ["--model", args.model] if args.model else []
                if args.engine == "vllm":
                    extra += ["--engine", "vllm", "--max-prompt-tokens", "64",
                              "--max-new-tokens-cap", str(args.new_tokens)]
                servers[n] = ServerProcess([*extra, "--adapters-dir", str(folder), "--adapter-slots", str(slots),
                                            "--max-adapters", str(n + 1), "--max-batch-rows", str(max(batches)),
                                            "--max-queue", str(2 * max(batches)), "--device", "cpu"],
                                           log_path=Path(tmp) / f"server-{n}.log")
            for n, server in servers.items():
                server.wait_ready(timeout_s=900, max_polls=9000)
            print(f"{args.engine} servers ready: {', '.join(f'{n} loaded' for n in counts)}; {slots} slots each; "
                  f"{args.new_tokens} new tokens a request")
            for rep in range(args.repeats + 1):  # the first round warms up (and pages in) and is dropped
                for batch in batches:
                    for n, server in servers.items():
                        tps = asyncio.run(_round(server.url, batch, used[n], args.new_tokens))
                        if rep:
                            samples.setdefault((f"{n} loaded", batch), []).append(tps)
                    first = servers[counts[0]]
                    tps = asyncio.run(_round(first.url, batch, None, args.new_tokens))
                    if rep:
                        samples.setdefault(("stock", batch), []).append(tps)
        finally:
            for server in servers.values():
                server.stop()
    rows = []
    print("batch | adapters loaded | used in the batch | tok/s | / stock")
    for batch in batches:
        stock = statistics.median(samples[("stock", batch)])
        for name in ["stock"] + [f"{n} loaded" for n in counts]:
            value = statistics.median(samples[(name, batch)])
            n = None if name == "stock" else int(name.split()[0])
            row = {"batch": batch, "loaded": n, "used": None if n is None else used[n], "tok_s": round(value, 2),
                   "ratio_to_stock": round(value / stock, 3)}
            rows.append(row)
            print(f"{batch} | {n if n is not None else 'stock'} | {row['used'] or ''} | {row['tok_s']} | "
                  f"{row['ratio_to_stock']}", flush=True)
    out_path = Path(args.out or "bench-results/bench-adapters-loaded.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({
        "bench": "adapters-loaded", "engine": args.engine, "adapter": str(source), "slots": slots,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "new_tokens": args.new_tokens, "repeats": args.repeats, "rows": rows}, indent=2))
    print(f"wrote {out_path}")
    return 0
