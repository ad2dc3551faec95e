"""`make gpu-check`: the checks a GPU machine runs, in one go, with one JSON and a summary.

A lent GPU machine has torch and transformers but no package registry and little time, so
this script needs nothing else of ours installed: it runs from the repository root with the
root on PYTHONPATH. Steps, each in its own process with its own time limit, so one that hangs
or fails still leaves the others' results:

  tests   pytest -m cuda: steering against the float64 reference in fp32 and bf16, batch
          independence, unsteered logits bit-identical, hot swap, the compiled static step
          (CUDA-graph replay) against eager decoding
  bench   fsrl bench on a random-weight Llama-3.2-1B shape with a 16k SAE: eager and the
          compiled static decode, base against steered, side by side

`--dry-run` runs the same steps on the CPU with a tiny shape, and the test suite runs it, so
the script cannot rot between GPU sessions. Output: OUT/gpu-check.json, OUT/summary.md and
each step's log.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def machine() -> dict:
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    return {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda_device": torch.cuda.get_device_name() if cuda else None,
            "cuda_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
            if cuda else None}


def run_step(name: str, cmd: list[str], out: Path, timeout_s: float) -> dict:
    """Run one step with its output in OUT/<name>.log; never raises."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    log = out / f"{name}.log"
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as fh:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    seconds = round(time.perf_counter() - start, 1)
    print(f"== {name}: rc={rc} in {seconds} s", flush=True)
    print("".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:]), flush=True)
    return {"name": name, "cmd": cmd, "rc": rc, "seconds": seconds, "log": log.name}


def test_results(junit: Path) -> dict:
    if not junit.exists():
        return {"ran": False}
    cases = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = "failed" if child.tag != "skipped" else "skipped"
                message = (child.get("message") or "")[:500]
                break
        else:
            message = ""
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "message": message})
    counts = {o: sum(c["outcome"] == o for c in cases) for o in ("passed", "failed", "skipped")}
    return {"ran": True, **counts, "cases": cases}


def summary(report: dict) -> str:
    m = report["machine"]
    lines = [f"# gpu-check {'(dry run, CPU)' if report['dry_run'] else ''}".rstrip(), "",
             f"{m['cuda_device'] or 'no CUDA device'}; torch {m['torch']}, transformers "
             f"{m['transformers']}, Python {m['python']}", "",
             "| step | rc | seconds |", "|---|---|---|"]
    lines += [f"| {s['name']} | {s['rc']} | {s['seconds']} |" for s in report["steps"]]
    tests = report["tests"]
    if tests.get("ran"):
        lines += ["", f"tests: {tests['passed']} passed, {tests['failed']} failed, "
                      f"{tests['skipped']} skipped"]
        lines += [f"- FAILED {c['test']}: {c['message']}" for c in tests["cases"] if c["outcome"] == "failed"]
    rows = report["bench"].get("rows", [])
    if rows:
        cols = ["setup", "batch", "base tok/s", "adapter tok/s", "adapter+8 tok/s",
                "adapter/base", "adapter+8/base"]
        lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "bench-results" / "gpu-check"))
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU, tiny shapes")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--bench-compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also the compiled static decode (default: on a GPU, not in a dry run)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    report = {"dry_run": args.dry_run, "machine": machine(), "steps": []}
    if not args.dry_run and not report["machine"]["cuda_device"]:
        print("gpu-check: no CUDA device here; use --dry-run for the CPU rehearsal", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"

    junit = out / "tests.xml"
    report["steps"].append(run_step("tests", [sys.executable, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider",
                                              f"--junitxml={junit}", "-q", "tests/test_device.py"],
                                    out, timeout_s=120 if args.dry_run else 300))
    report["tests"] = test_results(junit)

    report["bench"] = {}
    if not args.skip_bench:
        bench_json = out / "bench.json"
        compile_decode = args.bench_compile if args.bench_compile is not None else not args.dry_run
        cmd = [sys.executable, "-m", "fsrl.cli", "bench", "--device", device, "--no-default-model",
               "--out", str(bench_json)]
        cmd += (["--random-shapes", "tiny", "--batch-sizes", "1,2", "--new-tokens", "4", "--repeats", "1"]
                if args.dry_run else ["--random-shapes", "llama-1.2b", "--batch-sizes", "1,16",
                                      "--new-tokens", "64", "--repeats", "3"])
        if compile_decode:
            cmd.append("--compile-decode")
        report["steps"].append(run_step("bench", cmd, out, timeout_s=120 if args.dry_run else 360))
        if bench_json.exists():
            report["bench"] = json.loads(bench_json.read_text())

    (out / "gpu-check.json").write_text(json.dumps(report, indent=2))
    (out / "summary.md").write_text(summary(report))
    print(summary(report))
    failed = [s["name"] for s in report["steps"] if s["rc"] != 0]
    if failed:
        print(f"gpu-check: failed steps: {', '.join(failed)} (logs in {out})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
