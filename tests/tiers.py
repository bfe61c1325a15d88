"""Test tiers: each test gets its markers from what it uses, so a new test lands in its
tier without a decorator (tests/conftest.py installs the hook).

`make test` runs every test; `make test-fast` leaves out these four (pyproject.toml
registers them; an explicit `@pytest.mark.<name>` still works):
- real_model: it, or a fixture it uses, needs a real bundled model converted
  (`smollm2_folder`, `minilm_folder`), or it lives in tests/real/;
- subprocess: its module, or a tests/ module it imports from, starts processes
  (the subprocess module, multiprocessing, a Dask cluster);
- browser: it lives in tests/ui/;
- graph: it, a fixture it uses, or a tests/ function it calls runs Dagster on the asset
  graph (`materialize`, `execute_in_process`, `execute_job`).
"""

import inspect
import itertools
import re
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
FAST_EXCLUDES = ("real_model", "subprocess", "browser", "graph")

REAL_MODEL_FIXTURES = {"smollm2_folder", "minilm_folder"}
FOLDER_MARKS = {"real": "real_model", "ui": "browser"}
STARTS_PROCESSES = re.compile(r"\b(subprocess|Popen|multiprocessing|LocalCluster)\b")
RUNS_THE_GRAPH = re.compile(r"\b_?(materialize\w*|execute_in_process|execute_job)\(")


def mark_tiers(items) -> None:
    """Add each item's tier markers (pytest_collection_modifyitems)."""
    starts: dict[str, bool] = {}
    for item in items:
        for name in sorted(tiers_of(item, starts)):
            item.add_marker(name)


def tiers_of(item, starts: dict[str, bool]) -> set[str]:
    marks = set()
    if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
        marks.add("real_model")
    path = Path(str(item.path)).resolve()
    if path.is_relative_to(TESTS) and len(path.relative_to(TESTS).parts) > 1:
        marks.add(FOLDER_MARKS.get(path.relative_to(TESTS).parts[0], ""))
    module = getattr(item, "module", None)
    if module is not None:
        if module.__name__ not in starts:
            starts[module.__name__] = starts_processes(module, set())
        if starts[module.__name__]:
            marks.add("subprocess")
        if any(RUNS_THE_GRAPH.search(source) for source in _sources(item, module)):
            marks.add("graph")
    return marks - {""}


def starts_processes(module, seen: set) -> bool:
    """The module's source, or that of a tests/ module it imports from, starts processes."""
    seen.add(module.__name__)
    try:
        if STARTS_PROCESSES.search(inspect.getsource(module)):
            return True
    except (OSError, TypeError):
        return False
    for value in vars(module).values():
        owner = value if inspect.ismodule(value) else sys.modules.get(getattr(value, "__module__", None) or "")
        name = getattr(owner, "__name__", "")
        helper = name.startswith("tests.") and name not in {"tests.conftest", "tests.tiers"}
        if helper and name not in seen and starts_processes(owner, seen):
            return True
    return False


def _sources(item, module):
    """The source of the test, of the fixtures it uses, and of the tests/ functions these
    call by name (one level)."""
    functions = [getattr(item, "function", None)]
    fixtures = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    functions += [d.func for defs in fixtures.values() for d in defs]
    for f in [f for f in functions if _is_test_code(f)]:
        yield inspect.getsource(f)
        scope = {**vars(module), **getattr(f, "__globals__", {})}
        for name in f.__code__.co_names:
            if _is_test_code(scope.get(name)):
                yield inspect.getsource(scope[name])


def _is_test_code(f) -> bool:
    if not inspect.isfunction(f):
        return False
    try:
        return Path(inspect.getsourcefile(f) or "").resolve().is_relative_to(TESTS)
    except TypeError:
        return False


def may_select(config, marker: str) -> bool:
    """Whether the `-m` expression can select a test that carries `marker` (alone or with
    other tier markers)."""
    expr = config.option.markexpr
    if not expr:
        return True
    others = [m for m in FAST_EXCLUDES if m != marker]
    try:
        from _pytest.mark.expression import Expression  # pytest's own parser of `-m`

        compiled = Expression.compile(expr)
        combos = itertools.chain.from_iterable(itertools.combinations(others, k) for k in range(len(others) + 1))
        return any(compiled.evaluate(lambda name, on={marker, *combo}, **_: name in on) for combo in combos)
    except Exception:  # another pytest's parser: answer as if there were no `-m`
        return True
