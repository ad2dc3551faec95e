"""Wheel folders for `make wheelhouse` (scripts/build_wheelhouse.py) and `make gpu-check`
(scripts/gpu_check.py): listing, sizes, and which wheels a machine without a registry installs.

Standard library plus `packaging` (or pip's own copy of it), because gpu_check.py runs this on a
GPU machine where nothing of ours is installed.
"""

from __future__ import annotations

import functools
import platform
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

try:
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.tags import sys_tags
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import InvalidVersion, Version
except ImportError:  # pip vendors it: any machine that can install a wheel has it
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet
    from pip._vendor.packaging.tags import sys_tags
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename
    from pip._vendor.packaging.version import InvalidVersion, Version

MIB = 2**20
# What travels to a lent device machine: the working tree plus carried paths (device README).
DEVICE_TREE_LIMIT = 64 * MIB
MANIFEST = "manifest.json"


class WheelhouseError(Exception):
    """A wheel folder that cannot be used as it is (one clear line)."""


@dataclass(frozen=True)
class Wheel:
    path: Path
    name: str       # canonical: pydantic-core
    version: str
    tags: frozenset[str]
    bytes: int

    @property
    def pure(self) -> bool:
        return all(t.endswith("-any") for t in self.tags)

    def requires(self) -> list[str]:
        """Requires-Dist lines of the wheel's METADATA."""
        return [v for k, v in _headers(self.path) if k == "Requires-Dist"]

    def requires_python(self) -> str:
        return next((v for k, v in _headers(self.path) if k == "Requires-Python"), "")


@functools.lru_cache(maxsize=None)
def _headers(path: Path) -> tuple[tuple[str, str], ...]:
    """(key, value) headers of a wheel's .dist-info/METADATA."""
    with zipfile.ZipFile(path) as zf:
        meta = next((n for n in zf.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")), None)
        if meta is None:
            raise WheelhouseError(f"{path.name} has no .dist-info/METADATA")
        text = zf.read(meta).decode("utf-8", "replace")
    head = text.replace("\r\n", "\n").split("\n\n", 1)[0]  # the headers; the description follows
    return tuple((k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in head.splitlines())
                 if not k.startswith((" ", "\t")))


def list_wheels(folder: Path) -> list[Wheel]:
    """The wheels in `folder`, sorted by name; refuses two versions of one distribution (pip
    would stop the whole install at them)."""
    wheels = []
    for path in sorted(Path(folder).glob("*.whl")):
        try:
            name, version, _, tags = parse_wheel_filename(path.name)
        except Exception as exc:  # packaging's InvalidWheelFilename, across its versions
            raise WheelhouseError(f"not a wheel file name: {path.name} ({exc})") from exc
        wheels.append(Wheel(path, canonicalize_name(name), str(version), frozenset(str(t) for t in tags),
                            path.stat().st_size))
    versions: dict[str, set[str]] = {}
    for w in wheels:
        versions.setdefault(w.name, set()).add(w.version)
    doubled = {n: sorted(v) for n, v in versions.items() if len(v) > 1}
    if doubled:
        raise WheelhouseError("two versions of one distribution in " + str(folder) + ": " +
                              "; ".join(f"{n} {', '.join(v)}" for n, v in sorted(doubled.items())))
    return sorted(wheels, key=lambda w: (w.name, w.path.name))


def total_bytes(wheels: list[Wheel]) -> int:
    return sum(w.bytes for w in wheels)


def check_size(wheelhouse_bytes: int, tree_bytes: int = 0, limit: int = DEVICE_TREE_LIMIT) -> str:
    """One line on the sizes; raises WheelhouseError when the wheelhouse and the working tree
    that travels beside it are over `limit` together."""
    together = wheelhouse_bytes + tree_bytes
    line = (f"wheelhouse {wheelhouse_bytes / MIB:.1f} MiB + working tree {tree_bytes / MIB:.1f} MiB "
            f"= {together / MIB:.1f} MiB of the {limit / MIB:.0f} MiB that may travel to a device machine")
    if together > limit:
        raise WheelhouseError(f"too large: {line}; drop wheels (fewer --python versions) or shrink the tree")
    return line


def _python_ok(w: Wheel, python: str) -> bool:
    spec = w.requires_python()
    try:
        return not spec or SpecifierSet(spec).contains(python, prereleases=True)
    except Exception:  # an unparsable Requires-Python: let pip judge
        return True


def compatible(wheels: list[Wheel], tags: list[str] | None = None,
               python: str | None = None) -> dict[str, Wheel]:
    """For each distribution, its wheel this interpreter can install (its tags, the best-ranked
    one, and its Requires-Python), if any."""
    rank = {t: i for i, t in enumerate(tags if tags is not None else (str(t) for t in sys_tags()))}
    python = python or platform.python_version()
    best: dict[str, tuple[int, Wheel]] = {}
    for w in wheels:
        score = min((rank[t] for t in w.tags if t in rank), default=None)
        if score is not None and _python_ok(w, python) and (w.name not in best or score < best[w.name][0]):
            best[w.name] = (score, w)
    return {name: w for name, (_, w) in best.items()}


def why_not(ws: list[Wheel], python: str | None = None) -> str:
    """Why none of one distribution's wheels installs on this interpreter."""
    python = python or platform.python_version()
    needs = sorted({w.requires_python() for w in ws if not _python_ok(w, python)})
    if needs:
        return f"it needs Python {' or '.join(needs)}, this is {python}"
    pythons = sorted({t.split("-")[0] for w in ws for t in w.tags})
    platforms = sorted({t.split("-")[2] for w in ws for t in w.tags})
    return (f"no wheel for this Python and platform (the wheelhouse has {', '.join(pythons)} "
            f"on {', '.join(platforms)})")


def installed_versions() -> dict[str, str]:
    """Distributions this interpreter sees, first on sys.path wins: canonical name -> version."""
    from importlib.metadata import distributions

    found: dict[str, str] = {}
    for dist in distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonicalize_name(name), dist.version)
    return found


@dataclass
class InstallPlan:
    install: dict[str, Wheel] = field(default_factory=dict)   # name -> the wheel to install
    kept: dict[str, str] = field(default_factory=dict)        # name -> the version already here
    unavailable: dict[str, str] = field(default_factory=dict)  # name -> why it cannot be installed
    reasons: dict[str, str] = field(default_factory=dict)     # name -> why it is installed

    def to_json(self) -> dict:
        return {"install": {n: w.path.name for n, w in sorted(self.install.items())},
                "reasons": dict(sorted(self.reasons.items())), "kept": dict(sorted(self.kept.items())),
                "unavailable": dict(sorted(self.unavailable.items()))}


def _satisfies(version: str, req: Requirement) -> bool:
    try:
        return req.specifier.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


def plan_install(roots: list[str], wheels: list[Wheel], installed: dict[str, str], mode: str = "needed",
                 tags: list[str] | None = None, python: str | None = None,
                 leaves: tuple[str, ...] = ("fsrl",)) -> InstallPlan:
    """Which wheels to install so that `roots` (requirement strings: "pydantic>=2.7") import.

    The distributions reached from the roots through the wheels' own requirements (only those
    the wheelhouse holds: torch, numpy and the rest are the machine's) are installed when
    `mode` is "all", else ("needed") only those missing here or whose version here fails a
    requirement of a root or of a wheel being installed: the machine's own packages stay in
    front of everything they satisfy. A distribution with no wheel for this interpreter is
    `unavailable`, with the reason. The requirements of `leaves` (our own package, installed
    for its entry points; its code runs from the checkout) are not followed.
    """
    if mode not in ("needed", "all"):
        raise ValueError(f"mode must be 'needed' or 'all', got {mode!r}")
    by_name: dict[str, list[Wheel]] = {}
    for w in wheels:
        by_name.setdefault(w.name, []).append(w)
    usable = compatible(wheels, tags, python)
    env = {"extra": ""}

    def requirements(name: str) -> list[Requirement]:
        w = usable.get(name) or by_name[name][0]  # metadata is the same across one version's wheels
        out = []
        for line in w.requires():
            try:
                req = Requirement(line)
            except InvalidRequirement:
                continue
            if req.marker is None or req.marker.evaluate(env):
                out.append(req)
        return out

    root_reqs = []
    for line in roots:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env):
            root_reqs.append(req)
    # Every distribution reachable in the wheelhouse, and who asks for what.
    needed: dict[str, list[tuple[Requirement, str]]] = {}
    queue = [(r, "(root)") for r in root_reqs]
    seen: set[str] = set()
    while queue:
        req, by = queue.pop(0)
        name = canonicalize_name(req.name)
        needed.setdefault(name, []).append((req, by))
        if name in by_name and name not in seen and name not in leaves:
            seen.add(name)
            queue += [(r, name) for r in requirements(name)]

    plan = InstallPlan()
    chosen: set[str] = set()
    changed = True
    while changed:  # installing one may raise the bar for another: until nothing moves
        changed = False
        for name, asks in sorted(needed.items()):
            if name in chosen or name not in by_name:
                continue
            have = installed.get(name)
            binding = [(r, by) for r, by in asks if by == "(root)" or by in chosen]
            failing = [(r, by) for r, by in binding if have is not None and not _satisfies(have, r)]
            if mode == "all":
                why = "--install all"
            elif have is None:
                why = "not installed here"
            elif failing:
                r, by = failing[0]
                why = f"{have} here, {by} needs {r}"
            else:
                continue
            chosen.add(name)
            plan.reasons[name] = why
            changed = True
    for name in sorted(chosen):
        if name in usable:
            plan.install[name] = usable[name]
        else:
            have = installed.get(name)
            plan.unavailable[name] = (f"{name} {by_name[name][0].version}: {why_not(by_name[name], python)}"
                                      + (f"; {have} here stays" if have else ""))
            plan.reasons.pop(name)
    for name in sorted(needed):
        if name not in chosen and name in installed:
            plan.kept[name] = installed[name]
        elif name not in by_name and name not in installed:
            plan.unavailable[name] = f"{name}: not in the wheelhouse and not installed here"
    return plan
