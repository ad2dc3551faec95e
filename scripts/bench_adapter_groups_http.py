"""Grouped adapter pushes over HTTP: 16 concurrent /generate requests on the default model, K
distinct copies of the shipped `concise` adapter among them, against the same server code
from before the grouping (a git worktree at `--before`, default the commit before it), side by
side in one run: the servers take turns, round by round, and medians are kept. Loopback only;
each server is stopped by its PID; every request loop is bounded in count and time.
Prints a table and writes bench-results/adapter_groups_http.json.

    python scripts/bench_adapter_groups_http.py [--ks 1,4,16] [--rounds 3] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from fsrl.testing.server_process import ServerProcess

REPO = Path(__file__).resolve().parents[1]
BEFORE = "dacd93e^"  # the commit before "each distinct adapter runs on its own rows only"
ROWS = 16


async def one_round(url: str, k: int, new_tokens: int) -> float:
    """Tokens per second of 16 concurrent requests, adapters c0..c{k-1} in turn."""
    bodies = [{"prompt": f"Question {i}: how do tides work?", "adapter": f"c{i % k}",
               "max_new_tokens": new_tokens, "ignore_eos": True, "seed": i} for i in range(ROWS)]
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        started = time.perf_counter()
        answers = await asyncio.gather(*(client.post("/generate", json=b) for b in bodies))
        elapsed = time.perf_counter() - started
    tokens = 0
    for r in answers:
        r.raise_for_status()
        tokens += r.json()["steered"]["completion_tokens"]
    return tokens / elapsed


def start(tree: Path, adapters: Path, log: Path) -> ServerProcess:
    proc = ServerProcess(["--adapters-dir", str(adapters), "--device", "cpu", "--max-batch-rows", str(ROWS)],
                         env={"PYTHONPATH": str(tree)}, log_path=log, cwd=tree)
    proc.wait_ready(timeout_s=300)
    return proc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--before", default=BEFORE, help="the commit to compare against (default %(default)s)")
    parser.add_argument("--out", default="bench-results/adapter_groups_http.json")
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    work = Path(tempfile.mkdtemp(prefix="fsrl-groups-"))
    before_tree = work / "before"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(before_tree), args.before],
                   check=True)
    adapters = work / "adapters"
    for i in range(max(ks)):  # K distinct adapters: copies of concise under their own ids
        shutil.copytree(REPO / "adapters" / "concise", adapters / f"c{i}",
                        ignore=shutil.ignore_patterns("analysis", "checkpoints", "*.md"))
    servers = {}
    try:
        servers["before"] = start(before_tree, adapters, work / "before.log")
        servers["after"] = start(REPO, adapters, work / "after.log")
        samples: dict[str, dict[int, list[float]]] = {side: {k: [] for k in ks} for side in servers}
        for side, proc in servers.items():  # warm-up: every adapter once, not timed
            asyncio.run(one_round(proc.url, max(ks), 4))
        for _ in range(args.rounds):
            for k in ks:
                for side, proc in servers.items():
                    samples[side][k].append(asyncio.run(one_round(proc.url, k, args.new_tokens)))
    finally:
        for proc in servers.values():
            proc.stop()
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(before_tree)], check=False)
    rows = []
    print(f"{'K':>3} {'before tok/s':>13} {'after tok/s':>12} {'after/before':>13} {'after K/K=1':>12}")
    first = statistics.median(samples["after"][ks[0]])
    for k in ks:
        before, after = statistics.median(samples["before"][k]), statistics.median(samples["after"][k])
        rows.append({"k": k, "before_tok_s": before, "after_tok_s": after, "ratio": after / before,
                     "after_vs_first_k": after / first, "samples": {s: samples[s][k] for s in samples}})
        print(f"{k:>3} {before:>13.1f} {after:>12.1f} {after / before:>13.2f} {after / first:>12.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": ROWS, "new_tokens": args.new_tokens, "rounds": args.rounds,
                               "before": args.before, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
