"""`fsrl bench --serving`: the server under concurrent clients, end to end over HTTP.

Starts `fsrl serve` (loopback, a free port) on the chosen model with the adapters of
`--adapters-dir`, then measures, interleaved over `--repeats` rounds (medians kept, so drift on
a shared machine hits every figure alike):

- concurrency: the same mixed requests (adapters in turn, some with feature clamps, one in
  four unsteered; fixed length: `ignore_eos`) sent by 1, 4, 8 and 16 clients at once, against
  the same requests sent one at a time: aggregate tokens/s, p50/p99 latency, speed-up;
- compare: one `compare` request against one steered request (latency ratio);
- steered/base: the mixed requests against the same requests with no steering, 1 and 8
  clients (tokens/s ratio).

With `--engine vllm` it starts two servers, the default engine and `--engine vllm`, and
measures them in turn in every round: each engine's table, and vLLM's tokens/s over the default
engine's at each concurrency.

Prints a table and writes JSON. The server is stopped by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

PROMPTS = ["Tell me about the water cycle.", "How do bees make honey?", "Explain compound interest.",
           "What is a black hole?", "Give me tips for learning a language.", "Why is the sky blue?",
           "How does a bicycle stay upright?", "What causes the seasons?"]


def _percentile(values: list[float], q: float) -> float:
    """The q-quantile (0 < q < 1, in hundredths) of `values`: statistics.quantiles' own."""
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def mixed_requests(adapters: list[str], n: int, new_tokens: int, steered: bool = True) -> list[dict]:
    """Request i: prompt i, adapter i mod len (every fourth unsteered), clamps on every third."""
    out = []
    for i in range(n):
        body = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_new_tokens": new_tokens, "ignore_eos": True, "temperature": 0}
        if steered and i % 4 != 3:
            body["adapter"] = adapters[i % len(adapters)]
            if i % 3 == 0:
                body["features"] = [{"index": 7 + 31 * k, "op": "set", "value": 3.0} for k in range(4)]
        out.append(body)
    return out


async def _send_all(client, bodies: list[dict], clients: int) -> dict:
    """`clients` workers take the requests in order; wall time, tokens and latencies."""
    queue = list(enumerate(bodies))
    latencies: list[float] = []
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        while queue:
            _, body = queue.pop(0)
            start = time.perf_counter()
            r = await client.post("/generate", json=body)
            if r.status_code != 200:
                raise RuntimeError(f"/generate answered {r.status_code}: {r.text[:300]}")
            latencies.append(time.perf_counter() - start)
            tokens += r.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - start
    return {"wall_s": wall, "tokens": tokens, "latencies": latencies}


async def _measure(urls: dict[str, str], args: argparse.Namespace, adapters: list[str],
                   levels: list[int]) -> dict[str, dict[str, list[dict]]]:
    """Each engine's samples, by figure. With two servers (one per engine) each round measures
    one, then the other, so drift on the machine hits both alike."""
    import httpx

    n = max(*levels, 8)  # every level sends at least 8 requests
    mixed = mixed_requests(adapters, n, args.new_tokens)
    plain = mixed_requests(adapters, n, args.new_tokens, steered=False)
    one = mixed_requests(adapters, 1, args.new_tokens)[0]
    samples: dict[str, dict[str, list[dict]]] = {engine: {} for engine in urls}

    limits = httpx.Limits(max_connections=n + 4)
    clients = {engine: httpx.AsyncClient(base_url=url, timeout=600.0, limits=limits) for engine, url in urls.items()}
    try:
        # Warm-up, once at every concurrency: first calls at a batch shape (allocations, page
        # faults, kernel choice) cost more, and would land on whichever figure came first.
        for client in clients.values():
            for c in levels:
                await _send_all(client, mixed[:c], c)
            await _send_all(client, [{**one, "compare": True}], 1)
        for rep in range(args.repeats):
            print(f"round {rep + 1}/{args.repeats}", file=sys.stderr, flush=True)
            for engine, client in clients.items():
                keep = lambda name, result, e=engine: samples[e].setdefault(name, []).append(result)  # noqa: E731
                for c in levels:
                    bodies = mixed[:max(c, 8)] if c > 1 else mixed[:8]
                    keep(f"seq{len(bodies)}", await _send_all(client, bodies, 1))
                    keep(f"conc{c}", await _send_all(client, bodies, c))
                for c in (1, 8):
                    keep(f"plain{c}", await _send_all(client, plain[:8], c))
                    keep(f"steered{c}", await _send_all(client, mixed[:8], c))
                for _ in range(3):
                    keep("single", await _send_all(client, [one], 1))
                    keep("compare", await _send_all(client, [{**one, "compare": True}], 1))
    finally:
        for client in clients.values():
            await client.aclose()
    return samples


def _summarise(samples: dict[str, list[dict]], levels: list[int]) -> dict:
    def median(name: str, key: str) -> float:
        return statistics.median(s[key] for s in samples[name])

    def tps(name: str) -> float:
        return statistics.median(s["tokens"] / s["wall_s"] for s in samples[name])

    rows = []
    for c in levels:
        n = max(c, 8) if c > 1 else 8
        lat = [x for s in samples[f"conc{c}"] for x in s["latencies"]]
        rows.append({"clients": c, "requests": n, "tok/s": round(tps(f"conc{c}"), 1),
                     "p50 s": round(_percentile(lat, 0.5), 3), "p99 s": round(_percentile(lat, 0.99), 3),
                     "one at a time tok/s": round(tps(f"seq{n}"), 1),
                     "speed-up": round(median(f"seq{n}", "wall_s") / median(f"conc{c}", "wall_s"), 2)})
    single = statistics.median(x for s in samples["single"] for x in s["latencies"])
    compare = statistics.median(x for s in samples["compare"] for x in s["latencies"])
    return {"concurrency": rows,
            "compare/steered latency": round(compare / single, 3),
            "steered/base tok/s, 1 client": round(tps("steered1") / tps("plain1"), 3),
            "steered/base tok/s, 8 clients": round(tps("steered8") / tps("plain8"), 3)}


def run(args: argparse.Namespace) -> int:
    import logging

    import httpx
    import torch

    from fsrl.errors import FsrlError

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise

    levels = [int(c) for c in args.clients.split(",")]
    adapters_dir = Path(args.adapters_dir)
    if not any(adapters_dir.glob("*/adapter.json")):
        raise FsrlError(f"no adapters in {adapters_dir}; pass --adapters-dir DIR")
    from fsrl.testing.server_process import ServerProcess

    # --engine vllm measures the vLLM engine beside the default one, two servers, one run.
    engines = ["transformers", "vllm"] if args.engine == "vllm" else ["transformers"]
    common = ["--adapters-dir", str(adapters_dir), "--max-batch-rows", str(args.max_batch_rows)]
    for flag, value in (("--model", args.model), ("--sae", args.sae)):
        if value:
            common += [flag, value]
    # Packed unless told not to, whatever FSRL_PACK_CPU_WEIGHTS says in this environment.
    default = ["--device", args.device,
               "--no-pack-cpu-weights" if args.pack_cpu_weights is False else "--pack-cpu-weights"]
    # vLLM's KV cache is sized to the server's limits: keep them to what the bench sends.
    engine_args = {"transformers": default,
                   "vllm": ["--engine", "vllm", "--max-prompt-tokens", "256", "--max-new-tokens-cap", "256"]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    procs: dict[str, ServerProcess] = {}
    try:
        for engine in engines:
            log_path = out.with_suffix(".server.log" if len(engines) == 1 else f".{engine}.server.log")
            procs[engine] = proc = ServerProcess([*common, *engine_args[engine]], log_path=log_path)
            try:
                proc.wait_ready(timeout_s=900, max_polls=9000)
            except RuntimeError as exc:
                raise FsrlError(f"the {engine} server did not start; see {log_path}") from exc
        health = {engine: httpx.get(f"{proc.url}/health").json() for engine, proc in procs.items()}
        adapters = [a["id"] for a in httpx.get(f"{procs['transformers'].url}/adapters").json()["adapters"]]
        if not adapters:
            raise FsrlError(f"the server loaded no adapter from {adapters_dir}")
        samples = asyncio.run(_measure({e: p.url for e, p in procs.items()}, args, adapters, levels))
    finally:
        for proc in procs.values():
            proc.stop(timeout_s=30)
    summaries = {engine: _summarise(samples[engine], levels) for engine in engines}
    for engine, summary in summaries.items():
        print(f"engine: {engine}")
        columns = list(summary["concurrency"][0])
        print(" | ".join(columns))
        for row in summary["concurrency"]:
            print(" | ".join(str(row[c]) for c in columns))
        for key in ("compare/steered latency", "steered/base tok/s, 1 client", "steered/base tok/s, 8 clients"):
            print(f"{key}: {summary[key]}")
    if len(engines) == 2:
        side = {f"vllm/transformers tok/s, {row['clients']} clients": round(row["tok/s"] / ref["tok/s"], 3)
                for row, ref in zip(summaries["vllm"]["concurrency"], summaries["transformers"]["concurrency"])}
        summaries["vllm"]["against transformers"] = side
        for key, value in side.items():
            print(f"{key}: {value}")
    summary = summaries[engines[-1]]
    out.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "cuda": (torch.cuda.get_device_name()
                             if health["transformers"]["device"].startswith("cuda") else None)},
        "server": health["transformers"], "servers": health, "adapters": adapters,
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "func"},
        "summary": summary, "summaries": summaries, "samples": samples[engines[-1]],
        "samples_by_engine": samples}, indent=1))
    print(f"wrote {out}")
    return 0
