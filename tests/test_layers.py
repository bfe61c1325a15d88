"""The layering contract: imports only point down, and nothing imports in a circle.

    CLI        lqlora_dagster.cli, cli_args, cli_export, cli_generate, run_log, ui_session
    Dagster    assets.*, resources.*, lqlora_dagster.definitions
    pipeline   lqlora_dagster.pipeline.*, comparison, report, generate
    method     every other module of lqlora_dagster (quant, decompose, allocate, models,
               surgery, training, data, tasks, metrics, error_estimation, fisher, store, ...)

Read from the source with `ast`, every import counts, those inside functions too (they
hide cycles from Python, not from a reader). Only the Dagster layer imports dagster.
"""

import ast
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("lqlora_dagster", "assets", "resources")
LAYERS = ("method", "pipeline", "dagster", "cli")
CLI = {"lqlora_dagster.cli", "lqlora_dagster.cli_args", "lqlora_dagster.cli_export", "lqlora_dagster.cli_generate",
       "lqlora_dagster.run_log", "lqlora_dagster.ui_session"}
PIPELINE = ("lqlora_dagster.pipeline", "lqlora_dagster.comparison", "lqlora_dagster.report", "lqlora_dagster.generate")


def layer_of(module: str) -> str:
    if module in CLI:
        return "cli"
    if module.split(".")[0] in ("assets", "resources") or module == "lqlora_dagster.definitions":
        return "dagster"
    if any(module == p or module.startswith(p + ".") for p in PIPELINE):
        return "pipeline"
    return "method"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for top in PACKAGES for p in sorted((REPO / top).rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(project module imported, line) for every import in the file, resolved to the
    module it names (`from a.b import c` is a.b.c when c is a module, else a.b)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names]
        else:
            continue
        out += [(n, node.lineno) for n in names if n.split(".")[0] in PACKAGES]
    return out


def import_graph(modules: dict[str, Path]) -> dict[str, set[tuple[str, int]]]:
    known = set(modules)
    return {m: set(imports_of(p, known)) for m, p in modules.items()}


def upward_imports(graph) -> list[str]:
    return sorted(
        f"{src} ({layer_of(src)}) imports {dst} ({layer_of(dst)}) at line {line}"
        for src, edges in graph.items()
        for dst, line in edges
        if LAYERS.index(layer_of(dst)) > LAYERS.index(layer_of(src))
    )


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def package_of(module: str) -> str:
    """The unit cycles are judged at: a subpackage of lqlora_dagster, or a top-level one."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "lqlora_dagster" and len(parts) > 1 else parts[0]


@pytest.fixture(scope="module")
def graph():
    return import_graph(project_modules())


def test_imports_only_point_down(graph):
    assert upward_imports(graph) == []


def test_no_module_imports_in_a_circle(graph):
    assert cycles({m: {d for d, _ in e} for m, e in graph.items()}) == []


def test_no_package_imports_in_a_circle(graph):
    edges = defaultdict(set)
    for src, imported in graph.items():
        for dst, _ in imported:
            if package_of(src) != package_of(dst):
                edges[package_of(src)].add(package_of(dst))
    assert cycles(edges) == []


def test_only_the_dagster_layer_imports_dagster():
    offenders = []
    for module, path in project_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            if any(n.split(".")[0] == "dagster" for n in names) and layer_of(module) != "dagster":
                offenders.append(f"{module}:{node.lineno}")
    assert offenders == []


def test_the_contract_catches_an_upward_import(tmp_path):
    """The checks above can fail: a method module that reaches up into the pipeline, and
    two method packages that import each other, are both reported."""
    modules = project_modules()
    graph = import_graph(modules)
    graph["lqlora_dagster.quant.config"] = graph["lqlora_dagster.quant.config"] | {("lqlora_dagster.pipeline.settings", 1)}
    assert upward_imports(graph) == [
        "lqlora_dagster.quant.config (method) imports lqlora_dagster.pipeline.settings (pipeline) at line 1"
    ]
    edges = {"lqlora_dagster.models": {"lqlora_dagster.surgery"}, "lqlora_dagster.surgery": {"lqlora_dagster.models"}}
    assert cycles(edges) == [["lqlora_dagster.models", "lqlora_dagster.surgery"]]


def test_no_file_name_is_used_twice():
    """A module's name says what it holds: `assets/error_table.py` is the error-table asset,
    `lqlora_dagster/errors.py` the exceptions. No two modules (or a module and a package)
    share a name anywhere in the three packages."""
    seen = defaultdict(list)
    for top in PACKAGES:
        for path in (REPO / top).rglob("*"):
            if path.suffix == ".py" and path.stem != "__init__" or path.is_dir() and (path / "__init__.py").exists():
                seen[path.stem].append(path.relative_to(REPO).as_posix())
    assert {name: paths for name, paths in seen.items() if len(paths) > 1} == {}


def unexplained_local_imports(source: str) -> list[int]:
    """Lines of imports inside functions with no reason given: a comment on the line, or
    on the line above the group of imports that opens the function body."""
    lines = source.splitlines()
    missing = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        reason = False
        for node in fn.body:
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                reason = False
                continue
            above = lines[node.lineno - 2].strip()
            reason = reason or above.startswith("#") or "#" in lines[node.lineno - 1]
            if not reason:
                missing.append(node.lineno)
        nested = [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)) and n not in fn.body]
        missing += [n.lineno for n in nested if "#" not in lines[n.lineno - 1] and not lines[n.lineno - 2].strip().startswith("#")]
    return missing


def test_every_import_inside_a_function_says_why():
    """Imports inside functions only where they save start-up time (the CLI before dagster
    and torch, transformers before a model is read) or load an optional extra, each with
    the reason beside it; none to dodge a cycle (the contract above sees those anyway)."""
    found = {m: unexplained_local_imports(p.read_text()) for m, p in project_modules().items()}
    assert {m: lines for m, lines in found.items() if lines} == {}


def test_an_unexplained_local_import_is_reported():
    source = "def f():\n    import json\n\n    return json\n\n\ndef g():\n    # optional extra\n    import csv\n    import io\n"
    assert unexplained_local_imports(source) == [2]
