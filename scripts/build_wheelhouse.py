"""`make wheelhouse`: the wheels `make gpu-check` needs on a machine without a package registry.

A lent GPU machine has torch and transformers (and what they bring: numpy, safetensors,
tokenizers) but no registry. This writes into `wheelhouse/` (ignored by git) everything else the
check's steps import, as wheels, plus a wheel of this package (for the `serve` entry point):

  tests     pytest (and its own needs), pydantic, httpx (fsrl.testing)
  bench     pydantic (fsrl.adapter)
  serving   fastapi, starlette, uvicorn, pydantic-settings, prometheus-client, httpx, fsrl

Versions are pinned to what this environment has installed (the versions the suite runs with
here); pip downloads them, with what each needs on every Python in --pythons (3.10-3.14 by
default: the GPU machine's Python is not known in advance; one seen was 3.12). Pure-Python
wheels only, except pydantic-core, which is compiled: its manylinux x86-64 wheel is fetched
once per Python. Where the whole pinned set does not resolve for a Python (some pins need a
newer one), each step's share is fetched on its own, and what fails is reported, not fatal:
gpu_check.py then skips, on a machine with that Python, the steps that need a missing wheel.

Our own wheel leaves out fsrl/default_sae (12 MiB of weights the checkout beside it carries;
gpu_check.py puts the checkout first on the path): `--full-wheel` keeps it.

Checks the size: the wheelhouse and the working tree that travels with it (git's tracked and
untracked-not-ignored files) must fit the device tool's 64 MiB; it prints both and fails
clearly over. Writes wheelhouse/manifest.json: the steps' requirements (what gpu_check.py
installs from), pins, per-Python results, files and sizes.

    python scripts/build_wheelhouse.py [--out wheelhouse] [--pythons 3.11,3.12]
    python scripts/build_wheelhouse.py --ours-only --out DIR   # no registry: our wheel alone
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _wheels import (MANIFEST, MIB, Requirement, WheelhouseError, canonicalize_name,  # noqa: E402
                     check_size, list_wheels, total_bytes)

ROOT = Path(__file__).resolve().parent.parent
# Distributions each gpu-check step imports beyond torch and transformers.
STEP_NEEDS = {
    "tests": ["pytest", "pydantic", "httpx"],
    "bench": ["pydantic"],
    "serving": ["fastapi", "starlette", "uvicorn", "pydantic", "pydantic-settings", "prometheus-client",
                "httpx", "fsrl"],
}
# The GPU machine's own: never carried (compiled, large, and torch/transformers need their versions).
PROVIDED = {"torch", "transformers", "numpy", "safetensors", "tokenizers", "huggingface-hub", "triton"}
# Compiled dependencies fetched per Python (manylinux x86-64); any other compiled wheel is an error.
COMPILED_OK = {"pydantic-core"}
PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_27_x86_64", "manylinux_2_28_x86_64"]
PYTHONS = "3.10,3.11,3.12,3.13,3.14"


def root_requirements() -> list[str]:
    """The steps' distributions with the bounds pyproject.toml gives them ("pydantic>=2.7")."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: names alone
        declared = {}
    else:
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        lines = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
        declared = {canonicalize_name(Requirement(r).name): str(Requirement(r).specifier) for r in lines}
    names = sorted({canonicalize_name(n) for needs in STEP_NEEDS.values() for n in needs})
    return [n + declared.get(n, "") for n in names]


def step_roots(roots: list[str], step: str) -> list[str]:
    names = {canonicalize_name(n) for n in STEP_NEEDS[step]}
    return [r for r in roots if canonicalize_name(Requirement(r).name) in names]


def local_closure(roots: list[str], python: str | None = None) -> dict[str, str]:
    """name -> version installed here, for the roots and everything they need on `python`
    (default: this one), leaving out the machine's own (PROVIDED) and this package. What that
    Python needs and this environment lacks (tomli for 3.10, say) is left unpinned ("").
    pip download evaluates requirement markers for the Python it runs on, whatever
    --python-version says, so the other Pythons' needs are named here."""
    env = {"extra": ""}
    if python:
        env.update(python_version=python, python_full_version=f"{python}.0")
    pins: dict[str, str] = {}
    queue = [Requirement(r) for r in roots]
    while queue:
        req = queue.pop(0)
        name = canonicalize_name(req.name)
        if name in pins or name in PROVIDED or name == "fsrl":
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            pins[name] = ""
            continue
        pins[name] = dist.version
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or sub.marker.evaluate(env):
                queue.append(sub)
    return pins


def download(pins: dict[str, str], python: str, out: Path) -> tuple[bool, str]:
    """pip download of the pinned set (and what it needs on `python`) for manylinux x86-64."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as fh:
        fh.write("\n".join(f"{n}=={v}" if v else n for n, v in sorted(pins.items())) + "\n")
        reqs = fh.name
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--quiet",
           "--only-binary=:all:", "--implementation", "cp", "--python-version", python,
           *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(out), "-r", reqs]
    done = subprocess.run(cmd, capture_output=True, text=True)
    Path(reqs).unlink()
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
        return False, " / ".join(lines[-2:]) or f"pip exited {done.returncode}"
    return True, "ok"


def build_ours(out: Path, full: bool) -> Path:
    """A wheel of this package (no dependencies), built from a copy of the sources."""
    with tempfile.TemporaryDirectory(prefix="fsrl-wheel-src-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(ROOT / name, src / name)
        skip = ["__pycache__", "*.pyc"] + ([] if full else ["default_sae"])
        for package in ("fsrl", "server"):
            shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns(*skip))
        # Offline with this environment's setuptools when it has one; else pip fetches it.
        isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
        cmd = [sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "--quiet", "--no-deps",
               *isolation, "-w", str(out), str(src)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise WheelhouseError(f"could not build our wheel: {done.stderr.strip()[-1500:]}")
    built = sorted(out.glob("fsrl-*.whl"))
    if not built:
        raise WheelhouseError("pip wheel left no fsrl wheel")
    return built[-1]


def travelling_tree_bytes() -> int | None:
    """Bytes of git's tracked and untracked-not-ignored files (what a device call sends), or
    None outside a git checkout."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    paths = {p for p in listed.decode("utf-8", "replace").split("\0") if p}
    return sum((ROOT / p).stat().st_size for p in paths if (ROOT / p).is_file() and not (ROOT / p).is_symlink())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "wheelhouse")
    parser.add_argument("--pythons", default=PYTHONS, help=f"Python versions to fetch for (default {PYTHONS})")
    parser.add_argument("--ours-only", action="store_true",
                        help="no registry: only our wheel (and the manifest); for tests and rehearsals")
    parser.add_argument("--full-wheel", action="store_true", help="our wheel keeps fsrl/default_sae")
    parser.add_argument("--limit-mib", type=float, default=64.0,
                        help="wheelhouse + travelling working tree must fit (default 64: the device tool's)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    start = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)  # one version of each: never mix with an older build
    out.mkdir(parents=True)
    roots = root_requirements()
    manifest: dict = {"built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      "built_with": {"python": platform.python_version(), "platform": platform.platform()},
                      "roots": roots, "steps": STEP_NEEDS, "pythons": {}}
    try:
        if not args.ours_only:
            pins = local_closure(roots)
            manifest["pins"] = pins
            print(f"pins ({len(pins)}): " + ", ".join(f"{n}=={v}" for n, v in sorted(pins.items())), flush=True)
            for python in [p.strip() for p in args.pythons.split(",") if p.strip()]:
                theirs = local_closure(roots, python)
                if theirs != pins:
                    print(f"Python {python} also: " + ", ".join(f"{n}=={v}" if v else n for n, v in
                                                                sorted(theirs.items()) if pins.get(n) != v))
                ok, why = download(theirs, python, out)
                if ok:
                    manifest["pythons"][python] = {step: "ok" for step in STEP_NEEDS}
                else:  # step by step: a Python some pins exclude may still run the other steps
                    print(f"Python {python}: not every step: {why}", flush=True)
                    manifest["pythons"][python] = {
                        step: download(local_closure(step_roots(roots, step), python), python, out)[1]
                        for step in STEP_NEEDS}
                print(f"Python {python}: " + ", ".join(f"{step} {res}" for step, res in
                                                       manifest["pythons"][python].items()), flush=True)
            if not any(r == "ok" for results in manifest["pythons"].values() for r in results.values()):
                raise WheelhouseError("pip found the wheels for none of the Pythons: "
                                      + json.dumps(manifest["pythons"]))
        ours = build_ours(out, args.full_wheel)
        manifest["ours"] = ours.name
        wheels = list_wheels(out)
        stray = [w.path.name for w in wheels
                 if w.name in PROVIDED or (not w.pure and w.name not in COMPILED_OK)]
        if stray:
            raise WheelhouseError(f"wheels the GPU machine must not get from us (its own, or compiled): "
                                  f"{', '.join(stray)}; add compiled ones to COMPILED_OK only with care")
        manifest["wheels"] = [{"file": w.path.name, "name": w.name, "version": w.version, "bytes": w.bytes}
                              for w in wheels]
        manifest["total_bytes"] = total_bytes(wheels)
        tree = travelling_tree_bytes()
        manifest["tree_bytes"] = tree
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        for w in wheels:
            print(f"  {w.bytes / MIB:6.2f} MiB  {w.path.name}")
        print(f"{len(wheels)} wheels in {out} ({time.perf_counter() - start:.0f} s)")
        print(check_size(manifest["total_bytes"], tree or 0, int(args.limit_mib * MIB)))
    except WheelhouseError as exc:
        print(f"build_wheelhouse: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
