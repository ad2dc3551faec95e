"""The scripts, at a reduced size: the load/soak and fuzz scripts (each starts and stops its own
server), the GPU check's CPU rehearsal and the wheelhouse it installs from."""

import importlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_load_script_passes_with_16_clients_under_200_swap_cycles(tmp_path):
    # 12 s: the 200 cycles, spread over the run, need about 6 s here under the 16 clients (184
    # of them finished in a 5 s run); a pass needs every cycle done before the clock runs out.
    out = tmp_path / "load.json"
    run = subprocess.run([sys.executable, "scripts/load_test.py", "--clients", "16", "--seconds", "12",
                          "--swap-cycles", "200", "--many-adapters", "24", "--adapter-slots", "4",
                          "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["passed"] and report["server_errors"] == report["wrong_answers"] == 0
    assert report["swap_cycles"] == 200 and report["requests"] > 100 and report["rss_growth"] < 0.05
    # 27 adapters on 4 device slots: paged in and out throughout, each answer its adapter's own
    assert report["adapter_slots"] == 4 and report["adapters_loaded_at_end"] == 27 and report["counts"]["many"] > 20
    assert report["many_distinct_texts"] == 24  # a wrong adapter's text would show


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_schema_violation(tmp_path):
    """Every operation of the server's schema through every phase. One pass of them all takes
    about 4 s here; with --max-time schemathesis repeats fuzzing and the stateful phase until
    the time is spent (and leaves coverage a third of it), so 12 s is every phase whole, then
    more fuzzing."""
    from xml.etree import ElementTree

    from server.app import create_app
    from server.settings import Settings

    run = subprocess.run([sys.executable, "scripts/fuzz_api.py", "--max-examples", "5",
                          "--max-time", "12", "--report", str(tmp_path / "junit.xml")],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "failures=\"0\"" in (tmp_path / "junit.xml").read_text()
    report = ElementTree.parse(tmp_path / "junit.xml").getroot()
    assert report.get("failures") == report.get("errors") == "0"
    schema = create_app(Settings(device="cpu")).openapi()  # routes only: no model loads
    operations = {f"{method.upper()} {path}" for path, item in schema["paths"].items() for method in item}
    tested = {case.get("name") for case in report.iter("testcase")}
    assert "POST /generate" in operations and operations | {"Stateful tests"} <= tested, operations - tested


def _script(name: str):
    """A module of scripts/ (they import each other by plain name)."""
    if str(REPO / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO / "scripts"))
    return importlib.import_module(name)


def _fake_wheel(folder: Path, name: str, version: str, tag: str = "py3-none-any", requires=(),
                requires_python: str = "", size: int = 0) -> Path:
    """A wheel file with just enough in it for listing and planning (METADATA, padding)."""
    path = folder / f"{name.replace('-', '_')}-{version}-{tag}.whl"
    meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    meta += [f"Requires-Python: {requires_python}"] * bool(requires_python)
    meta += [f"Requires-Dist: {r}" for r in requires]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", "\n".join(meta) + "\n\nA description.\n")
        zf.writestr("padding.bin", os.urandom(size))
    return path


def test_wheelhouse_listing_size_check_and_install_plan(tmp_path):
    w = _script("_wheels")
    _fake_wheel(tmp_path, "fastapi", "1.0", requires=["starlette>=2", "pydantic>=2.9"], size=3000)
    _fake_wheel(tmp_path, "starlette", "2.1", requires=["anyio<5,>=4", 'tomli; python_version < "3.0"'])
    _fake_wheel(tmp_path, "pydantic", "2.10", requires=["pydantic-core==2.5"])
    _fake_wheel(tmp_path, "pydantic-core", "2.5", tag="cp399-cp399-manylinux_2_17_x86_64")
    _fake_wheel(tmp_path, "anyio", "4.2", requires_python=">=3.99")
    _fake_wheel(tmp_path, "fsrl", "0.1.0", requires=["torch>=2.4", "sae-lens>=6"])
    wheels = w.list_wheels(tmp_path)
    assert [x.name for x in wheels] == ["anyio", "fastapi", "fsrl", "pydantic", "pydantic-core", "starlette"]
    assert wheels[1].bytes == (tmp_path / "fastapi-1.0-py3-none-any.whl").stat().st_size > 3000
    assert w.total_bytes(wheels) == sum(p.stat().st_size for p in tmp_path.glob("*.whl"))

    line = w.check_size(10 * w.MIB, 40 * w.MIB)
    assert "wheelhouse 10.0 MiB + working tree 40.0 MiB = 50.0 MiB of the 64 MiB" in line
    with pytest.raises(w.WheelhouseError, match="too large: wheelhouse 30.0 MiB .* = 70.0 MiB"):
        w.check_size(30 * w.MIB, 40 * w.MIB)

    roots = ["fastapi>=0.115", "fsrl"]
    tags = ["py3-none-any"]  # pydantic-core's wheel is for another Python
    plan = w.plan_install(roots, wheels, {"starlette": "2.5", "pydantic": "2.7", "anyio": "4.0"}, tags=tags)
    assert sorted(plan.install) == ["fastapi", "fsrl", "pydantic"]  # fsrl's torch and sae-lens not followed
    assert plan.reasons["pydantic"] == "2.7 here, fastapi needs pydantic>=2.9"
    assert plan.kept == {"starlette": "2.5", "anyio": "4.0"}
    assert "no wheel for this Python and platform" in plan.unavailable["pydantic-core"]
    assert "anyio" not in plan.unavailable  # kept: 4.0 satisfies starlette's anyio<5,>=4
    everything = w.plan_install(roots, wheels, {"starlette": "2.5", "anyio": "4.0"}, mode="all", tags=tags,
                                python="3.12.3")
    assert sorted(everything.install) == ["fastapi", "fsrl", "pydantic", "starlette"]
    assert everything.unavailable["anyio"] == "anyio 4.2: it needs Python >=3.99, this is 3.12.3; 4.0 here stays"

    _fake_wheel(tmp_path, "anyio", "4.3")
    with pytest.raises(w.WheelhouseError, match="two versions of one distribution.*anyio 4.2, 4.3"):
        w.list_wheels(tmp_path)


def test_build_wheelhouse_without_a_registry_builds_our_wheel_and_manifest(tmp_path):
    pytest.importorskip("setuptools", reason="our wheel builds offline with this environment's setuptools")
    build = _script("build_wheelhouse")
    assert build.main(["--ours-only", "--out", str(tmp_path / "wh")]) == 0
    manifest = json.loads((tmp_path / "wh" / "manifest.json").read_text())
    wheel = tmp_path / "wh" / manifest["ours"]
    assert [x["file"] for x in manifest["wheels"]] == [wheel.name] and wheel.name.startswith("fsrl-")
    assert {"fastapi>=0.115", "pydantic>=2.7", "pytest>=8", "uvicorn>=0.30", "fsrl"} <= set(manifest["roots"])
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "serve = server.cli" in entry_points and "server/playground/index.html" in names
    assert not any("default_sae" in n for n in names)  # the checkout beside it carries the SAE
    assert manifest["total_bytes"] == wheel.stat().st_size < 2 * 2**20


def test_gpu_check_skips_a_step_whose_imports_fail_and_says_why(tmp_path):
    gpu_check = _script("gpu_check")
    check = gpu_check.Check(tmp_path, dry_run=True, budget_s=60)
    check.report["machine"] = {"python": "3.11"}
    step = check.step("serving", [sys.executable, "-c", "raise SystemExit(3)"],
                      probe=["json", "no_such_module_for_gpu_check"])
    assert step["status"] == "skipped" and step["rc"] is None
    assert "No module named 'no_such_module_for_gpu_check'" in step["reason"] and "make wheelhouse" in step["reason"]
    ran = check.step("bench", [sys.executable, "-c", "print('hello from the step')"], probe=["json"])
    assert ran["status"] == "passed" and ran["imports"]["json"].endswith("json/__init__.py")
    assert "hello from the step" in (tmp_path / "gpu-check.log").read_text()
    check.report["budget_s"], check.deadline = 60, 0  # the budget is spent: nothing more starts
    assert "budget" in check.step("tests", [sys.executable, "-c", "pass"])["reason"]
    summary = (tmp_path / "summary.md").read_text()
    assert "| serving | skipped |  | 0.0 |" in summary and "| bench | passed | 0 |" in summary
    assert "- serving: cannot import what it needs" in summary


@pytest.mark.slow
def test_gpu_check_dry_run_passes_and_reports_tests_bench_and_serving(tmp_path):
    """The CPU rehearsal, with a wheelhouse of our wheel alone (built offline): the install
    step runs, and the serving bench finds `fsrl serve` through the installed entry point."""
    pytest.importorskip("setuptools", reason="our wheel builds offline with this environment's setuptools")
    assert _script("build_wheelhouse").main(["--ours-only", "--out", str(tmp_path / "wh")]) == 0
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "scripts/gpu_check.py", "--dry-run", "--out", str(out),
                          "--wheelhouse", str(tmp_path / "wh")],
                         cwd=REPO, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["dry_run"] and report["complete"]
    assert [(s["name"], s["status"]) for s in report["steps"]] == [
        (name, "passed") for name in ("wheelhouse", "tests", "bench", "bank", "serving-setup", "serving")] + [
        ("vllm", "skipped"), ("vllm-bench", "skipped")]  # a dry run leaves vLLM out unless --vllm
    assert report["wheelhouse"]["installed"] == ["fsrl==0.1.0"] and not report["wheelhouse"]["plan"]["unavailable"]
    site = report["wheelhouse"]["site"]
    serving = next(s for s in report["steps"] if s["name"] == "serving")
    # our wheel, installed by the check (an editable checkout may add its own egg-info beside it)
    assert any(path.startswith(site) for path in serving["imports"]["serve-entry-point"])
    assert report["tests"]["passed"] > 0 and report["tests"]["failed"] == 0
    assert {r["batch"] for r in report["bench"]["rows"]} == {1, 2}
    assert [r["distinct"] for r in report["bank"]["rows"]] == [1, 4, 16]  # at batch 16, of a 64-slot bank
    assert all(r["max_abs_diff"] < 1e-4 for r in report["bank"]["rows"]) and "| 16 | 16 |" in (out / "summary.md").read_text()
    assert [r["clients"] for r in report["serving"]["summary"]["concurrency"]] == [1, 4]
    assert report["serving"]["summary"]["concurrency"][1]["tok/s"] > 0
    assert report["serving"]["server"]["device"] == "cpu" and len(report["serving"]["adapters"]) == 2
    summary = (out / "summary.md").read_text()
    assert "| tests | passed | 0 |" in summary and "| serving | passed | 0 |" in summary
    assert "serving: `fsrl serve` on cpu" in summary and "steered/base tok/s, 8 clients" in summary
    assert sorted(p.name for p in out.iterdir()) == sorted(set(_script("gpu_check").OUTPUTS) - {"vllm-check.json"})
    assert report["seconds"] < report["budget_s"]


def test_the_adapters_curve_plot_draws_every_batch_of_each_bench(tmp_path):
    """scripts/plot_adapters_curve.py on small JSONs of the shapes `fsrl bench --adapters`,
    `--adapters --loaded` and `--engine vllm` write: one line per batch size and engine."""
    distinct = {"setup": "tiny", "rows": [{"batch": b, "distinct": k, "ratio_to_stock": 1 - k / 100}
                                          for b in (4, 16) for k in (0, 1, 4)]}
    loaded = {"slots": 16, "rows": [{"batch": 4, "loaded": n, "ratio_to_stock": 0.9} for n in (None, 1, 16)]}
    vllm = {"rows": [{"batch": 4, "mode": m, "ratio": 0.95} for m in ("vanilla", "adapter", "K=4 adapters")]}
    paths = {}
    for name, data in (("distinct", distinct), ("loaded", loaded), ("vllm", vllm)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(data))
    out = tmp_path / "curve.svg"
    assert _script("plot_adapters_curve").main([str(paths["distinct"]), "--loaded", str(paths["loaded"]),
                                                "--vllm", str(paths["vllm"]), "--out", str(out)]) == 0
    svg = out.read_text()
    for label in ("batch 4", "batch 16", "vLLM, batch 4", "adapters loaded"):
        assert label in svg, label
