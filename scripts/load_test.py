"""Load and soak test: many clients, mixed requests, adapters swapped and unloaded under load.

    python scripts/load_test.py [--clients 16] [--seconds 120] [--swap-cycles 200] [--out FILE]

Starts `fsrl serve` on a tiny random model (loopback, a free port; `--adapter-slots 2` by
default, fewer than the adapters the mix names, so they are paged in and out under the load)
and runs, for `--seconds`:
- `--clients` clients, each sending one request after another, drawn from a fixed mix:
  adapters, feature clamps, `compare`, SSE streaming and the OpenAI route, all at temperature
  0 or with a fixed seed, so every answer has one right text;
- one swapper doing `--swap-cycles` cycles spread over the run: replace adapter `swap` with
  the other of two weight sets (`replace: true`), load adapter `temp`, unload it;
- with `--many-adapters N`, N more adapters (constant pushes of their own, built with
  `POST /adapters` before the load), and half of each client's requests name one of them at
  random (`--max-adapters` is raised to fit them).

Every answer is checked against references taken one request at a time before the load
starts: a request for one of the many adapters must get that adapter's own text, one for `swap` either weight set's text
(whichever was loaded when it started), one for `temp` its text or a 404 (unloaded). Passes
when there is no 5xx, no transport error, no wrong answer, and the server's memory (RSS) after
the swap cycles is within 5 % of what it was after the first tenth of them. Writes a JSON
report; stops the server by its PID; exit status 0 on a pass, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from _harness import start_tiny_server

WEIGHTS = {"a": "tiny", "b": "more/tiny-b"}  # the two weight sets `swap` alternates between
BODIES = [
    {"prompt": "hello there", "max_new_tokens": 12},
    {"prompt": "a longer prompt that takes a while", "max_new_tokens": 20},
    {"prompt": "clamped", "max_new_tokens": 10, "features": [{"index": 3, "op": "set", "value": 5.0}]},
    {"prompt": "seeded", "max_new_tokens": 16, "temperature": 0.9, "seed": 5, "top_k": 20},
    {"prompt": "compare me", "max_new_tokens": 12, "compare": True},
]
ADAPTERS = ["tiny", "swap", "temp", None]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def answer_key(answer: dict) -> tuple:
    return answer["steered"]["text"], (answer.get("base") or {}).get("text")


async def generate(client: httpx.AsyncClient, body: dict, stream: bool) -> tuple[int, tuple | None]:
    """(status, (steered text, base text)) through /generate, streamed or not."""
    if not stream:
        r = await client.post("/generate", json=body)
        return r.status_code, answer_key(r.json()) if r.status_code == 200 else None
    async with client.stream("POST", "/generate", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, None
        final, streamed = None, {"steered": "", "base": ""}
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                if event.get("type") == "response":
                    final = event["response"]
                elif event.get("type") == "token":
                    streamed[event["output"]] += event["text"]
                elif "error" in event:
                    return 500, None
        if final is None:
            return 200, None
        key = answer_key(final)
        # The tokens as they came must add up to the final texts.
        return 200, key if (streamed["steered"], streamed["base"] if key[1] is not None else None) == key else ("stream mismatch", streamed)


async def chat(client: httpx.AsyncClient, body: dict, adapter: str | None, model: str) -> tuple[int, tuple | None]:
    steering = {"features": body["features"]} if "features" in body else {}
    r = await client.post("/v1/chat/completions", json={
        "model": adapter or model, "messages": [{"role": "user", "content": body["prompt"]}],
        "max_tokens": body["max_new_tokens"], "temperature": 0, "ignore_eos": True, "steering": steering})
    return r.status_code, (r.json()["choices"][0]["message"]["content"],) if r.status_code == 200 else None


async def references(client: httpx.AsyncClient, model: str) -> dict:
    """The one right answer of every (kind, body, weights), one request at a time."""
    refs = {}
    for name, path in WEIGHTS.items():
        assert (await client.post("/adapters", json={"id": f"ref-{name}", "path": path})).status_code == 201
    for i, body in enumerate(BODIES):
        for weights in ("a", "b", None):
            adapter = f"ref-{weights}" if weights else None
            full = {**body, "ignore_eos": True, **({"adapter": adapter} if adapter else {})}
            status, key = await generate(client, full, stream=False)
            assert status == 200, status
            refs[("generate", i, weights)] = key
            status, key = await chat(client, body, adapter, model)
            assert status == 200, status
            refs[("chat", i, weights)] = key
    for name in WEIGHTS:
        await client.delete(f"/adapters/ref-{name}")
    return refs


def many_id(k: int) -> str:
    return f"many-{k:04d}"


async def build_many(client: httpx.AsyncClient, n: int) -> dict[str, str]:
    """N constant adapters, each pushing three features its own way; their texts, one at a time."""
    d_sae = 64  # within the tiny SAE's width
    texts = {}
    for k in range(n):
        pushes = [{"index": k % d_sae, "value": 20.0 + 6 * (k // d_sae)},
                  {"index": (k * 37 + 11) % d_sae, "value": -12.0 - 5 * (k % 5)},
                  {"index": (k * 13 + 29) % d_sae, "value": 15.0 + 4 * (k % 3)}]
        r = await client.post("/adapters", json={"id": many_id(k), "constant": {"features": pushes}, "replace": True})
        assert r.status_code == 201, r.text
        status, key = await generate(client, {**BODIES[0], "ignore_eos": True, "adapter": many_id(k)}, stream=False)
        assert status == 200, status
        texts[many_id(k)] = key
    return texts


async def run(args: argparse.Namespace, url: str, pid: int) -> dict:
    limits = httpx.Limits(max_connections=args.clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120.0, limits=limits) as client:
        model = (await client.get("/health")).json()["model"]
        refs = await references(client, model)
        many = await build_many(client, args.many_adapters)
        assert (await client.post("/adapters", json={"id": "swap", "path": WEIGHTS["a"]})).status_code == 201
        assert (await client.post("/adapters", json={"id": "temp", "path": WEIGHTS["a"]})).status_code == 201
        stats: Counter[str] = Counter()
        wrong: list[dict] = []
        rss: dict[str, int] = {"start": rss_kib(pid)}
        rss_by_tenth: list[int] = []  # a plateau and a leak look alike in two samples
        deadline = time.monotonic() + args.seconds

        async def one_client(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(args.max_requests_per_client):
                if time.monotonic() > deadline:
                    return
                if many and rng.random() < 0.5:
                    adapter = many_id(rng.randrange(args.many_adapters))
                    body = {**BODIES[0], "ignore_eos": True, "adapter": adapter}
                    try:
                        status, key = await generate(client, body, stream=rng.random() < 0.5)
                    except httpx.HTTPError as exc:
                        stats["transport_error"] += 1
                        wrong.append({"kind": "many", "adapter": adapter, "error": repr(exc)})
                        continue
                    stats[f"{status // 100}xx"] += 1
                    stats["many"] += 1
                    if status != 200 or key != many[adapter]:
                        wrong.append({"kind": "many", "adapter": adapter, "status": status, "got": key})
                    continue
                i, adapter = rng.randrange(len(BODIES)), rng.choice(ADAPTERS)
                kind = rng.choice(["generate", "stream", "chat"])
                body = {**BODIES[i], "ignore_eos": True, **({"adapter": adapter} if adapter else {})}
                try:
                    if kind == "chat":
                        status, key = await chat(client, BODIES[i], adapter, model)
                    else:
                        status, key = await generate(client, body, stream=kind == "stream")
                except httpx.HTTPError as exc:
                    stats["transport_error"] += 1
                    wrong.append({"kind": kind, "adapter": adapter, "body": i, "error": repr(exc)})
                    continue
                stats[f"{status // 100}xx"] += 1
                stats[f"{kind}:{adapter}"] += 1
                if status == 404 and adapter == "temp":
                    continue  # unloaded at that moment: the right answer
                if status != 200:
                    wrong.append({"kind": kind, "adapter": adapter, "body": i, "status": status})
                    continue
                ref_kind = "chat" if kind == "chat" else "generate"
                allowed = {"tiny": ["a"], "temp": ["a"], "swap": ["a", "b"], None: [None]}[adapter]
                if key not in [refs[(ref_kind, i, w)] for w in allowed]:
                    wrong.append({"kind": kind, "adapter": adapter, "body": i, "got": key})

        async def swapper() -> None:
            interval = args.seconds * 0.9 / args.swap_cycles
            for cycle in range(args.swap_cycles):
                if time.monotonic() > deadline:
                    break
                started = time.monotonic()
                target = WEIGHTS["b" if cycle % 2 == 0 else "a"]
                for method, path, body in (("POST", "/adapters", {"id": "swap", "path": target, "replace": True}),
                                           ("DELETE", "/adapters/temp", None),
                                           ("POST", "/adapters", {"id": "temp", "path": WEIGHTS["a"]})):
                    r = await client.request(method, path, json=body)
                    stats[f"swap:{r.status_code}"] += 1
                stats["swap_cycles"] += 1
                if (cycle + 1) % max(1, args.swap_cycles // 10) == 0:
                    rss_by_tenth.append(rss_kib(pid))
                await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

        began = time.monotonic()
        await asyncio.gather(swapper(), *(one_client(1000 + c) for c in range(args.clients)))
        elapsed = time.monotonic() - began
        rss["end"] = rss_kib(pid)
        if rss_by_tenth:
            rss["after_first_tenth"] = rss_by_tenth[0]
        metrics = (await client.get("/metrics")).text
        adapters_loaded = len((await client.get("/adapters")).json()["adapters"])
    baseline = rss.get("after_first_tenth", rss["start"])
    growth = rss["end"] / baseline - 1
    server_errors = sum(n for k, n in stats.items() if k == "5xx" or k.startswith("swap:5"))
    requests = sum(n for k, n in stats.items() if k[:1].isdigit() and k.endswith("xx"))
    shared = [l for l in metrics.splitlines() if l.startswith("fsrl_batch_size_")]
    report = {
        "clients": args.clients, "seconds": round(elapsed, 1), "requests": requests,
        "swap_cycles": stats["swap_cycles"], "server_errors": server_errors,
        "transport_errors": stats["transport_error"], "wrong_answers": len(wrong),
        "rss_kib": rss, "rss_kib_by_tenth_of_the_swaps": rss_by_tenth, "rss_growth": round(growth, 4),
        "counts": dict(sorted(stats.items())),
        "wrong_examples": wrong[:10], "batch_size_histogram": shared,
        "many_adapters": args.many_adapters, "many_distinct_texts": len(set(many.values())),
        "adapters_loaded_at_end": adapters_loaded,
        "paging": [l for l in metrics.splitlines() if l.startswith("fsrl_adapter_") and not l.startswith("fsrl_adapter_requests")],
    }
    report["passed"] = (server_errors == 0 and not wrong and stats["transport_error"] == 0
                        and stats["swap_cycles"] == args.swap_cycles and growth < 0.05 and requests > 0)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--swap-cycles", type=int, default=200)
    parser.add_argument("--max-requests-per-client", type=int, default=100_000,
                        help="a bound on each client's loop besides the clock")
    parser.add_argument("--adapter-slots", type=int, default=2,
                        help="the server's device slots: fewer than the three adapters the mix names "
                             "(tiny, swap, temp), so adapters are paged in and out under the load")
    parser.add_argument("--engine", choices=["transformers", "vllm"], default="transformers",
                        help="the server's engine (vllm: needs `make vllm`)")
    parser.add_argument("--many-adapters", type=int, default=0,
                        help="this many more adapters loaded, half of the requests naming one at random")
    parser.add_argument("--out", type=Path, default=Path("bench-results/load_test.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fsrl-load-") as tmp:
        # vLLM's CPU attention takes heads of 32: its tiny model is 128 wide.
        _, server = start_tiny_server(Path(tmp), "--max-queue", str(args.clients * 4),
                                      "--adapter-slots", str(args.adapter_slots),
                                      "--max-adapters", str(args.many_adapters + 8), "--engine", args.engine,
                                      hidden=128 if args.engine == "vllm" else 64)
        try:
            report = asyncio.run(run(args, server.url, server.proc.pid))
        finally:
            server.stop()
    report["adapter_slots"], report["engine"] = args.adapter_slots, args.engine
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{'clients':>8} {'adapters':>8} {'slots':>6} {'seconds':>8} {'requests':>9} {'swaps':>6} {'5xx':>4} "
          f"{'wrong':>6} {'rss growth':>11}")
    print(f"{report['clients']:>8} {report['adapters_loaded_at_end']:>8} {report['adapter_slots']:>6} "
          f"{report['seconds']:>8} {report['requests']:>9} {report['swap_cycles']:>6} "
          f"{report['server_errors']:>4} {report['wrong_answers']:>6} {report['rss_growth']:>10.1%}")
    print("\n".join(report["paging"]))
    print(f"{'PASS' if report['passed'] else 'FAIL'}; report: {args.out}")
    if report["wrong_examples"]:
        print(json.dumps(report["wrong_examples"][:3], indent=1), file=sys.stderr)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
