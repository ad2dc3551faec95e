"""The load/soak and fuzz scripts, at a reduced size: each starts and stops its own server."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("decode", [[], ["--compile-decode"]], ids=["eager", "compiled"])
def test_load_script_passes_with_16_clients_under_200_swap_cycles(tmp_path, decode):
    out = tmp_path / "load.json"
    run = subprocess.run([sys.executable, "scripts/load_test.py", "--clients", "16", "--seconds", "40",
                          "--swap-cycles", "200", "--out", str(out), *decode],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["passed"] and report["server_errors"] == report["wrong_answers"] == 0
    assert report["swap_cycles"] == 200 and report["requests"] > 100 and report["rss_growth"] < 0.05


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_schema_violation(tmp_path):
    run = subprocess.run([sys.executable, "scripts/fuzz_api.py", "--max-examples", "5",
                          "--max-time", "90", "--report", str(tmp_path / "junit.xml")],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "failures=\"0\"" in (tmp_path / "junit.xml").read_text()


def test_gpu_check_dry_run_passes_and_reports_tests_and_bench(tmp_path):
    run = subprocess.run([sys.executable, "scripts/gpu_check.py", "--dry-run", "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert report["dry_run"] and [s["rc"] for s in report["steps"]] == [0, 0]
    assert report["tests"]["passed"] > 0 and report["tests"]["failed"] == 0
    assert {r["batch"] for r in report["bench"]["rows"]} == {1, 2}
    assert "| tests | 0 |" in (tmp_path / "summary.md").read_text()
