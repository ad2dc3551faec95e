"""`make gpu-check`: the checks a GPU machine runs, in one go, with one JSON and a summary.

A lent GPU machine has torch and transformers but no package registry and little time, so
this script runs from the repository root with the root on PYTHONPATH, and takes what else the
steps import from `wheelhouse/` (`make wheelhouse` on a machine with the registry; carry the
folder along) when there is one. Steps, each in its own process (group) with its own time
limit inside one overall budget (--budget-s, 450 s on a GPU: under 8 minutes in all), so one
that hangs or fails still leaves the others' results:

  wheelhouse     pip install --no-index --no-deps --find-links wheelhouse --target TMP, for the
                 wheelhouse's listed packages that this machine lacks or has in a version they
                 cannot use (--install all: every one); torch, transformers and the rest of the
                 machine's packages are never touched. TMP goes on PYTHONPATH after the checkout
  tests          pytest -m cuda: steering against the float64 reference in fp32 and bf16, batch
                 independence, unsteered logits bit-identical, hot swap
  bench          fsrl bench on a random-weight Llama-3.2-1B shape with a 16k SAE: base against
                 steered, side by side
  bank           fsrl bench --bank-kernel: the adapter bank's product (grouped by slot) against
                 every slot on every token, 1-64 distinct adapters of 64 slots, batch 16 and 64
  serving-setup  a random model (512 wide, 8 layers; the tests' character tokenizer), a 4,096-
                 feature SAE and two synthetic adapters, written to a temporary folder
  serving        fsrl bench --serving on them: `fsrl serve` under 1-16 concurrent clients
  vllm           python -m fsrl.testing.vllm_check: steering inside vLLM's compiled model against
                 fsrl's own engine, token for token (tiny model), when the machine has vLLM (its
                 CUDA wheel, ~400 MB, cannot travel in a device call's 64 MiB); skipped otherwise
  vllm-bench     fsrl bench --engine vllm on the random Llama-3.2-1B shape (bf16, 16k SAE): stock
                 vLLM, steered vLLM and fsrl's own engine at batch 1 and 16, into gpu-check.json
                 (both vLLM steps want more than the default budget: pass --budget-s 900)
  vllm-bench-gemma2  the same on the random Gemma-2-2B shape (the paper's model; bf16, 16k SAE at
                 layer 12); not in the dry run (--budget-s 1200 for all three vLLM steps)

Before each step its imports are tried; a step whose packages are missing (no wheelhouse, or
no wheel for this Python in it) is skipped with the reason in the JSON, and does not fail the
check. `--dry-run` runs the same steps on the CPU with tiny shapes (and --install all, so the
install is real), and the test suite runs it, so the script cannot rot between GPU sessions.

Output, up to eight files: OUT/gpu-check.json, OUT/summary.md, OUT/gpu-check.log (every
step's output in turn), tests.xml, bench.json, bench-serving.json and its .server.log, and
vllm-check.json when the vllm step ran. The JSON and summary are rewritten after every step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from _wheels import MANIFEST, WheelhouseError, installed_versions, list_wheels, plan_install  # noqa: E402

OUTPUTS = ["gpu-check.json", "summary.md", "gpu-check.log", "tests.xml", "bench.json", "bench-serving.json",
           "bench-serving.server.log", "vllm-check.json"]
# Modules each step imports beyond torch and transformers, tried before it runs.
PROBES = {
    "tests": ["pytest", "pydantic", "httpx", "safetensors"],
    "bench": ["pydantic", "safetensors"],
    "bank": ["pydantic", "safetensors"],
    "serving-setup": ["pydantic", "safetensors", "httpx", "tokenizers"],
    "serving": ["fastapi", "starlette", "uvicorn", "pydantic_settings", "prometheus_client", "httpx"],
    "vllm": ["vllm", "safetensors", "httpx"],  # the check lives in fsrl.testing, which imports httpx
    "vllm-bench": ["vllm", "safetensors", "pydantic"],
}
PROBE = ("import importlib, json, sys\n"
         "found = {}\n"
         "for m in sys.argv[1:]:\n"
         "    if m == 'serve-entry-point':\n"
         "        from importlib.metadata import distributions\n"
         "        # Every distribution that adds `fsrl serve` (an editable checkout's egg-info too).\n"
         "        serve = [str(getattr(d, '_path', d.metadata['Name'])) for d in distributions()\n"
         "                 if any(e.group == 'fsrl.commands' and e.name == 'serve' for e in d.entry_points)]\n"
         "        if not serve:\n"
         "            sys.exit('no `fsrl serve`: the fsrl.commands entry point comes with our wheel')\n"
         "        found[m] = serve\n"
         "    else:\n"
         "        found[m] = getattr(importlib.import_module(m), '__file__', None)\n"
         "print(json.dumps(found))\n")
# (seconds on a GPU, seconds in a dry run): each step's own limit, within the budget.
LIMITS = {"wheelhouse": (90, 90), "tests": (170, 90), "bench": (170, 90), "bank": (90, 60), "serving-setup": (60, 60),
          "serving": (150, 120), "vllm": (240, 240), "vllm-bench": (300, 240),
          "vllm-bench-gemma2": (300, 0)}
MIN_STEP_S = 20  # a step is not started with less of the budget left
SERVING_SHAPES = {"gpu": {"hidden": 512, "n_layers": 8, "d_sae": 4096, "layer": 4},
                  "cpu": {"hidden": 64, "n_layers": 2, "d_sae": 256, "layer": 1}}


def machine() -> dict:
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    return {"platform": platform.platform(), "python": platform.python_version(),
            "python_tag": sys.implementation.cache_tag,
            "executable": sys.executable, "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda_device": torch.cuda.get_device_name() if cuda else None,
            "cuda_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
            if cuda else None}


class Check:
    """The report, the shared log, the budget and the steps' environment."""

    def __init__(self, out: Path, dry_run: bool, budget_s: float):
        self.out, self.dry_run = out, dry_run
        self.deadline = time.monotonic() + budget_s
        self.started = time.monotonic()
        self.log = out / "gpu-check.log"
        self.log.write_text("")
        self.site: Path | None = None  # where the wheelhouse installed to
        self.report: dict = {"dry_run": dry_run, "budget_s": budget_s, "complete": False, "steps": []}

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        path = [str(ROOT), str(self.site) if self.site else "", os.environ.get("PYTHONPATH", "")]
        return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p), "PYTHONUNBUFFERED": "1",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(extra or {})}

    def write(self) -> None:
        self.report["seconds"] = round(time.monotonic() - self.started, 1)
        (self.out / "gpu-check.json").write_text(json.dumps(self.report, indent=2))
        (self.out / "summary.md").write_text(summary(self.report))

    def skip(self, name: str, reason: str) -> dict:
        step = {"name": name, "status": "skipped", "rc": None, "seconds": 0.0, "reason": reason}
        print(f"== {name}: skipped: {reason}", flush=True)
        with open(self.log, "a") as fh:
            fh.write(f"\n==== {name}: skipped: {reason}\n")
        self.report["steps"].append(step)
        self.write()
        return step

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def _run(self, cmd: list[str], timeout_s: float, env: dict[str, str]) -> int | str:
        """One command in its own process group, output appended to the log; on timeout the whole
        group (a server it started too) is stopped, by its id."""
        with open(self.log, "ab") as fh:
            fh.write(f"$ {' '.join(cmd)}\n".encode())
            fh.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                return proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                    try:
                        os.killpg(proc.pid, sig)
                    except ProcessLookupError:
                        break
                    try:
                        proc.wait(timeout=grace)
                        break
                    except subprocess.TimeoutExpired:
                        continue
                return "timeout"

    def probe(self, modules: list[str], env: dict[str, str]) -> tuple[str | None, dict]:
        """Import `modules` in a fresh interpreter with the steps' environment: (None, where each
        came from), or (why not, {})."""
        try:
            done = subprocess.run([sys.executable, "-c", PROBE, *modules], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            return "importing them took over 120 s", {}
        if done.returncode == 0:
            try:
                return None, json.loads(done.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                return None, {}
        lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
        return (lines[-1] if lines else f"exit {done.returncode}"), {}

    def step(self, name: str, cmd: list[str], probe: list[str] | None = None,
             env: dict[str, str] | None = None) -> dict:
        """Run one step (after its import probe) within the budget; never raises."""
        env = env or self.env()
        left = self.remaining()
        if left < MIN_STEP_S:
            return self.skip(name, f"the check's time budget ({self.report['budget_s']:.0f} s, --budget-s) "
                                   f"is spent ({left:.0f} s left)")
        missing, imports = self.probe(probe, env) if probe else (None, {})
        if missing:
            unavailable = self.report.get("wheelhouse", {}).get("plan", {}).get("unavailable", {})
            hint = (f" (not installable here: {'; '.join(unavailable.values())})" if unavailable else
                    "" if self.site else " (no wheelhouse installed: `make wheelhouse` where pip reaches "
                                         "a registry, then carry wheelhouse/ along)")
            return self.skip(name, f"cannot import what it needs: {missing}{hint}")
        timeout_s = min(LIMITS[name][1 if self.dry_run else 0], left)
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        offset = self.log.stat().st_size
        with open(self.log, "a") as fh:
            fh.write(f"\n==== {name} (limit {timeout_s:.0f} s)\n")
        start = time.perf_counter()
        rc = self._run(cmd, timeout_s, env)
        seconds = round(time.perf_counter() - start, 1)
        status = "passed" if rc == 0 else "timeout" if rc == "timeout" else "failed"
        with open(self.log, "a") as fh:
            fh.write(f"==== {name}: {status} (rc {rc}) in {seconds} s\n")
        print(f"== {name}: {status} (rc={rc}) in {seconds} s", flush=True)
        with open(self.log, "rb") as fh:
            fh.seek(offset)
            print("".join(fh.read().decode(errors="replace").splitlines(keepends=True)[-15:]), flush=True)
        entry = {"name": name, "status": status, "rc": rc, "seconds": seconds, "limit_s": round(timeout_s),
                 "cmd": cmd, "log": self.log.name, **({"imports": imports} if imports else {})}
        self.report["steps"].append(entry)
        self.write()
        return entry

    def install_wheelhouse(self, folder: Path | None, mode: str) -> None:
        """The wheelhouse step: plan, then one pip call (one per package if that fails)."""
        if folder is None:
            self.report["wheelhouse"] = {"present": False}
            self.skip("wheelhouse", "--no-wheelhouse")
            return
        info: dict = {"path": str(folder), "present": folder.is_dir(), "mode": mode}
        self.report["wheelhouse"] = info
        if not folder.is_dir():
            self.skip("wheelhouse", f"no wheelhouse at {folder}: the steps use what this machine has "
                                    "(`make wheelhouse` where pip reaches a registry, then carry it along)")
            return
        try:
            wheels = list_wheels(folder)
            manifest = json.loads((folder / MANIFEST).read_text()) if (folder / MANIFEST).exists() else {}
            roots = manifest.get("roots") or sorted({w.name for w in wheels})
            plan = plan_install(roots, wheels, installed_versions(), mode)
        except (WheelhouseError, OSError, ValueError) as exc:
            info["error"] = str(exc)
            self.report["steps"].append({"name": "wheelhouse", "status": "failed", "rc": None, "seconds": 0.0,
                                         "reason": str(exc)})
            self.write()
            return
        info.update(manifest={k: manifest.get(k) for k in ("built", "built_with", "pythons")},
                    wheels=len(wheels), plan=plan.to_json())
        if not plan.install:
            self.skip("wheelhouse", "nothing to install: this machine has every listed package "
                                    f"({len(plan.kept)} kept)")
            return
        self.site = Path(tempfile.mkdtemp(prefix="fsrl-gpu-check-site-"))
        info["site"] = str(self.site)
        pip = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
               "--disable-pip-version-check", "--quiet", "--find-links", str(folder), "--target", str(self.site)]
        pins = [f"{n}=={w.version}" for n, w in sorted(plan.install.items())]
        entry = self.step("wheelhouse", pip + pins, env={**os.environ, "PIP_NO_INPUT": "1"})
        if entry["status"] == "failed":  # one bad wheel should not keep the others out
            failed = [p for p in pins if self.remaining() < 2 * MIN_STEP_S
                      or self._run(pip + ["--upgrade", p], min(60, self.remaining() / 2), {**os.environ}) != 0]
            info["failed"] = failed
            entry["reason"] = (f"pip refused {', '.join(failed)}; the other {len(pins) - len(failed)} "
                               "installed one at a time" if failed else "installed one at a time")
            if not failed:
                entry["status"] = "passed"
            self.write()
        info["installed"] = [p for p in pins if p not in info.get("failed", [])] if entry["status"] != "timeout" else []


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
    m = report.get("machine", {})
    lines = [f"# gpu-check {'(dry run, CPU)' if report['dry_run'] else ''}".rstrip(), "",
             f"{m.get('cuda_device') or 'no CUDA device'}; torch {m.get('torch')}, transformers "
             f"{m.get('transformers')}, Python {m.get('python')}", ""]
    wh = report.get("wheelhouse", {})
    plan = wh.get("plan")
    if plan:
        installed = wh.get("installed", [])
        lines.append(f"wheelhouse (--install {wh['mode']}): {len(installed)} installed"
                     + (f" ({', '.join(installed)})" if installed else "")
                     + f"; {len(plan['kept'])} already here")
        lines += [f"- not installable: {why}" for why in plan["unavailable"].values()]
        lines += [f"- pip refused: {p}" for p in wh.get("failed", [])]
        lines.append("")
    elif wh.get("error"):
        lines += [f"wheelhouse: {wh['error']}", ""]
    if not report.get("complete"):
        lines += ["(incomplete: the check was still running when this was written)", ""]
    lines += ["| step | status | rc | seconds |", "|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {'' if s['rc'] is None else s['rc']} | {s['seconds']} |"
              for s in report["steps"]]
    lines += [f"- {s['name']}: {s['reason']}" for s in report["steps"] if s.get("reason")]
    lines.append(f"\n{report.get('seconds', 0)} s of the {report['budget_s']:.0f} s budget")
    tests = report.get("tests", {})
    if tests.get("ran"):
        lines += ["", f"tests: {tests['passed']} passed, {tests['failed']} failed, "
                      f"{tests['skipped']} skipped"]
        lines += [f"- FAILED {c['test']}: {c['message']}" for c in tests["cases"] if c["outcome"] == "failed"]
    rows = report.get("bench", {}).get("rows", [])
    if rows:
        cols = ["setup", "batch", "base tok/s", "adapter tok/s", "adapter+8 tok/s",
                "adapter/base", "adapter+8/base"]
        lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    bank = report.get("bank", {})
    if bank.get("rows"):
        lines += ["", f"bank: {bank['bank_slots']} slots of {bank['d_in']} x {bank['d_sae']} ({bank['dtype']}), "
                      f"kernel: {bank['kernel']}; CUDA graphs: {bank['cuda_graphs']}",
                  "", "| batch | distinct | slot_matmul us | every slot us | every slot / slot_matmul |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['batch']} | {r['distinct']} | {r['slot_matmul_us']} | {r['every_slot_us']} | {r['speedup']} |"
                  for r in bank["rows"]]
    serving = report.get("serving", {}).get("summary")
    if serving:
        shape = report["serving"].get("shape", {})
        lines += ["", f"serving: `fsrl serve` on {report['serving'].get('server', {}).get('device', '?')}, "
                      f"random model {shape.get('hidden')} wide x {shape.get('n_layers')} layers, "
                      f"SAE {shape.get('d_sae')}, adapters {', '.join(report['serving'].get('adapters', []))}"]
        cols = list(serving["concurrency"][0])
        lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in serving["concurrency"]]
        lines += [""] + [f"- {k}: {v}" for k, v in serving.items() if k != "concurrency"]
    vllm = report.get("vllm")
    if vllm and "got" in vllm:
        lines += ["", f"vllm: {len(vllm['got'])} steering cases against fsrl's own engine, "
                      f"{vllm['failures']} failures (vllm-check.json)"]
    vllm_bench = report.get("vllm_bench")
    if vllm_bench and vllm_bench.get("rows"):
        lines += ["", f"vllm-bench: {vllm_bench['setup']}, against stock vLLM in the same run",
                  "", "| mode | batch | tok/s | / vanilla |", "|---|---|---|---|"]
        lines += [f"| {r['mode']} | {r['batch']} | {r['tok_s']} | {r['ratio']} |" for r in vllm_bench["rows"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "bench-results" / "gpu-check"))
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU, tiny shapes")
    parser.add_argument("--wheelhouse", type=Path, default=ROOT / "wheelhouse",
                        help="wheels to install from first, when the folder exists (default: ./wheelhouse)")
    parser.add_argument("--no-wheelhouse", action="store_true", help="install nothing")
    parser.add_argument("--install", choices=["needed", "all"], default=None,
                        help="needed: the listed packages this machine lacks or has in an unusable "
                             "version (default on a GPU); all: every listed one (default in a dry run)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="the whole check's time limit (default: 450 on a GPU, 240 in a dry run); a step "
                             "cut at it takes up to 15 s more to stop")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--skip-serving", action="store_true")
    parser.add_argument("--vllm", action=argparse.BooleanOptionalAction, default=None,
                        help="also the vLLM steering check, when vLLM is installed (default: on a GPU, "
                             "not in a dry run)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:  # never report an earlier run's files as this one's
        (out / name).unlink(missing_ok=True)
    budget = args.budget_s if args.budget_s is not None else 240.0 if args.dry_run else 450.0
    check = Check(out, args.dry_run, budget)
    report = check.report
    report["machine"] = machine()  # first: the Python this machine has decides which wheels install
    check.write()
    if not args.dry_run and not report["machine"]["cuda_device"]:
        print("gpu-check: no CUDA device here; use --dry-run for the CPU rehearsal", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    scratch = Path(tempfile.mkdtemp(prefix="fsrl-gpu-check-"))
    try:
        check.install_wheelhouse(None if args.no_wheelhouse else args.wheelhouse.resolve(),
                                 args.install or ("all" if args.dry_run else "needed"))

        junit = out / "tests.xml"
        check.step("tests", [sys.executable, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider",
                             f"--junitxml={junit}", "-q", "tests/test_device.py"], PROBES["tests"],
                   env=check.env({"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}))
        report["tests"] = test_results(junit)

        report["bench"] = {}
        if args.skip_bench:
            check.skip("bench", "--skip-bench")
        else:
            bench_json = out / "bench.json"
            cmd = [sys.executable, "-m", "fsrl.cli", "bench", "--device", device, "--no-default-model",
                   "--out", str(bench_json)]
            cmd += (["--random-shapes", "tiny", "--batch-sizes", "1,2", "--new-tokens", "4", "--repeats", "1"]
                    if args.dry_run else ["--random-shapes", "llama-1.2b", "--batch-sizes", "1,16",
                                          "--new-tokens", "64", "--repeats", "3"])
            check.step("bench", cmd, PROBES["bench"])
            if bench_json.exists():
                report["bench"] = json.loads(bench_json.read_text())
                check.write()

        # #25: the adapter bank's product, grouped by slot, against every slot on every token, for
        # 1-64 distinct adapters in a 64-slot bank at batch 16 and 64 (into gpu-check.json).
        bank_json = scratch / "bench-bank.json"
        cmd = [sys.executable, "-m", "fsrl.cli", "bench", "--bank-kernel", "--device", device, "--out", str(bank_json)]
        cmd += (["--random-shapes", "tiny", "--batch-sizes", "16", "--repeats", "1", "--calls", "3"]
                if args.dry_run else ["--random-shapes", "llama-1.2b", "--repeats", "3"])
        check.step("bank", cmd, PROBES["bank"])
        report["bank"] = json.loads(bank_json.read_text()) if bank_json.exists() else {}
        check.write()

        report["serving"] = {}
        if args.skip_serving:
            check.skip("serving", "--skip-serving")
        else:
            shape = SERVING_SHAPES["cpu" if args.dry_run else "gpu"]
            setup_dir = scratch / "serving"
            setup = check.step("serving-setup", [
                sys.executable, "-c", "import json, sys; from pathlib import Path; "
                "from fsrl.testing import write_bench_setup; "
                "write_bench_setup(Path(sys.argv[1]), **json.loads(sys.argv[2]))",
                str(setup_dir), json.dumps(shape)], PROBES["serving-setup"])
            report["serving"] = {"shape": shape}
            if setup["status"] != "passed":
                check.skip("serving", f"serving-setup {setup['status']}")
            else:
                serving_json = out / "bench-serving.json"
                cmd = [sys.executable, "-m", "fsrl.cli", "bench", "--serving", "--device", device,
                       "--model", str(setup_dir / "model"), "--sae", str(setup_dir / "sae"),
                       "--adapters-dir", str(setup_dir / "adapters"), "--out", str(serving_json)]
                cmd += (["--clients", "1,4", "--repeats", "1", "--new-tokens", "8", "--max-batch-rows", "4"]
                        if args.dry_run else ["--clients", "1,4,8,16", "--repeats", "2", "--new-tokens", "32",
                                              "--max-batch-rows", "16"])
                check.step("serving", cmd, PROBES["serving"] + ["serve-entry-point"])
                if serving_json.exists():
                    done = json.loads(serving_json.read_text())
                    report["serving"].update({k: done.get(k) for k in ("server", "adapters", "summary")})
        report["vllm"] = {}
        if not (args.vllm if args.vllm is not None else not args.dry_run):
            check.skip("vllm", "not asked for (--vllm)")
            check.skip("vllm-bench", "not asked for (--vllm)")
        else:
            vllm_json = out / "vllm-check.json"
            check.step("vllm", [sys.executable, "-m", "fsrl.testing.vllm_check", "--root", str(scratch / "vllm"),
                                "--json", str(vllm_json)], PROBES["vllm"])
            if vllm_json.exists():
                report["vllm"] = json.loads(vllm_json.read_text())
            # #13's GPU target: steered / stock vLLM at batch 1 and 16 on a 1B shape with a 16k SAE,
            # beside fsrl's own engine. Its JSON goes into gpu-check.json (8 files come back at most).
            bench_json = scratch / "vllm-bench.json"
            cmd = [sys.executable, "-m", "fsrl.cli", "bench", "--engine", "vllm", "--device", device,
                   "--out", str(bench_json)]
            cmd += (["--random-shapes", "tiny", "--batch-sizes", "1,2", "--new-tokens", "4", "--repeats", "1"]
                    if args.dry_run else ["--random-shapes", "llama-1.2b", "--batch-sizes", "1,16",
                                          "--new-tokens", "64", "--repeats", "3"])
            check.step("vllm-bench", cmd, PROBES["vllm-bench"])
            report["vllm_bench"] = json.loads(bench_json.read_text()) if bench_json.exists() else {}
            check.write()
            # The paper's model shape (Gemma-2-2B, bf16, 16k SAE at layer 12) beside the Llama one.
            if args.dry_run:
                check.skip("vllm-bench-gemma2", "the dry run measures the tiny shape only")
            else:
                gemma_json = scratch / "vllm-bench-gemma2.json"
                check.step("vllm-bench-gemma2", [
                    sys.executable, "-m", "fsrl.cli", "bench", "--engine", "vllm", "--device", device,
                    "--out", str(gemma_json), "--random-shapes", "gemma2-2b", "--batch-sizes", "1,16",
                    "--new-tokens", "64", "--repeats", "3"], PROBES["vllm-bench"])
                report["vllm_bench_gemma2"] = json.loads(gemma_json.read_text()) if gemma_json.exists() else {}
                check.write()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if check.site:
            shutil.rmtree(check.site, ignore_errors=True)
        report["complete"] = True
        check.write()
    print(summary(report))
    failed = [s["name"] for s in report["steps"] if s["status"] in ("failed", "timeout")]
    skipped = [s["name"] for s in report["steps"] if s["status"] == "skipped"]
    if skipped:
        print(f"gpu-check: skipped steps: {', '.join(skipped)} (reasons in {out / 'summary.md'})", file=sys.stderr)
    if failed:
        print(f"gpu-check: failed steps: {', '.join(failed)} (log: {check.log})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
