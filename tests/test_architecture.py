"""The layers point one way: the library (`fsrl/`) never imports the server, the scripts or the
tests (not even by a module name in a string), and no module of `fsrl/` or `server/` is part of
an import cycle. Read from the source (AST), every import counted, inside functions too."""

import ast
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("fsrl", "server")
OUTSIDE_THE_LIBRARY = ("server", "scripts", "tests")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported_names(name: str, path: Path) -> tuple[set[str], set[str]]:
    """Modules `path` imports (absolute names), and string constants that look like a module
    of the server, scripts or tests."""
    names, strings = set(), set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                re.fullmatch(r"(server|scripts|tests)(\.[A-Za-z_]\w*)+(:\w+)?", node.value):
            strings.add(node.value)
    return names, strings


def graph() -> dict[str, set[str]]:
    known = modules()
    edges = {}
    for name, path in known.items():
        names, _ = imported_names(name, path)
        deps = set()
        for imported in names:
            parts = imported.split(".")
            while parts and ".".join(parts) not in known:
                parts.pop()
            if parts and ".".join(parts) != name:
                deps.add(".".join(parts))
        edges[name] = deps
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_library_never_imports_the_server_the_scripts_or_the_tests():
    upward = []
    for name, path in modules().items():
        if not name.startswith("fsrl"):
            continue
        names, strings = imported_names(name, path)
        upward += [f"{name} imports {n}" for n in names if n.split(".")[0] in OUTSIDE_THE_LIBRARY]
        upward += [f"{name} names {s!r}" for s in strings]
    assert upward == []


def test_no_module_is_part_of_an_import_cycle():
    assert cycles(graph()) == []


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path):
    """The two rules above can fail: a cycle and an upward import are found where they exist."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    module = tmp_path / "m.py"
    module.write_text("from ..server import app\nimport importlib\nimportlib.import_module('server.cli')\n")
    names, strings = imported_names("fsrl.sub.m", module)
    assert "fsrl.server" in names and strings == {"server.cli"}
    module.write_text("def f():\n    from server.engine import Engine\n")
    assert "server.engine" in imported_names("fsrl.m", module)[0]


EDGE = ("server.params", "server.schemas", "server.openai_schemas")


def test_the_http_edge_is_a_leaf_that_loads_no_torch_and_no_engine():
    """The request models need only pydantic and plain data: importing them loads neither
    torch nor the engine, the serving layer or the web framework."""
    probe = ("import sys\n" + "".join(f"import {m}\n" for m in EDGE) +
             "print(sorted(m for m in ('torch', 'fastapi', 'server.engine', 'server.serving', 'server.state')"
             " if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


TOOLING = ("fsrl.testing", "fsrl.bench")        # test builders and checks; benchmarks
TOOLING_ONLY = ("httpx", "playwright")           # what only the tooling needs (the `tools` extra)


def test_the_runtime_never_imports_the_tooling_or_what_only_the_tooling_needs():
    """`pip install fsrl` serves and trains: no module outside fsrl.testing and fsrl.bench imports
    them, nor httpx or playwright (which only they declare, in the `tools` extra)."""
    found = []
    for name, path in modules().items():
        if name.startswith(TOOLING):
            continue
        names, _ = imported_names(name, path)
        found += [f"{name} imports {n}" for n in names
                  if n.startswith(TOOLING) or n.split(".")[0] in TOOLING_ONLY]
    assert found == []
    assert {n for n in modules() if n.startswith(TOOLING)} >= {"fsrl.testing", "fsrl.testing.server_process",
                                                              "fsrl.testing.vllm_check", "fsrl.bench", "fsrl.bench.vllm"}


def test_the_tooling_check_sees_a_runtime_module_that_imports_the_tooling(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    import httpx\n    from fsrl.testing import tiny_sae\n")
    names, _ = imported_names("fsrl.m", module)
    assert "httpx" in names and any(n.startswith(TOOLING) for n in names)
