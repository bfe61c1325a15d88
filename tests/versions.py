"""The version constants that are bumped by hand, and the source each one covers.

A `*_VERSION` constant goes into content keys or Dagster code versions: bumping it is
how a change of results re-marks what was computed before. tests/versions.lock.json
records each constant's value and a hash of its covered source; tests/test_versions.py
fails when that source changed but the value did not. Hashes are of the syntax tree
without docstrings, comments, layout or the `*_VERSION` lines themselves, so only a
change of code counts.

    python -m tests.versions             # what changed since the lock
    python -m tests.versions --update    # after bumping (or deciding not to): record it

A version covers the module that defines it (its stage) and the method modules whose
results that stage stores; edit COVERS when code moves or a stage starts using more.
"""

import argparse
import ast
import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = Path(__file__).resolve().parent / "versions.lock.json"
PACKAGES = ("lqlora_dagster", "assets", "resources")
UPDATE = "python -m tests.versions --update"

P = "lqlora_dagster/"
COVERS: dict[str, tuple[str, ...]] = {
    # base_model: the target matrices and their shapes (DuckDB matrices), the model's key
    "CODE_VERSION": (P + "models/targets.py", P + "models/layer_types.py", P + "models/kinds.py"),
    # task_data: a registered dataset's rows and how a run's parts are split
    "DATA_VERSION": (P + "data/datasets.py", P + "data/files.py", P + "data/parsers.py", P + "data/checks.py",
                     P + "data/selection.py"),
    # the bundled corpora's rows (content id builtin-<name>-N)
    "BUILTIN_VERSION": (P + "data/corpora.py", P + "data/polarity.py"),
    # calibration_batches: the task's examples, tokenized and windowed
    "CALIBRATION_VERSION": (P + "tasks.py", P + "data/encode.py", P + "data/windows.py"),
    # fisher_diagonals: the empirical Fisher diagonal (DuckDB fisher_stats)
    "FISHER_VERSION": (P + "fisher.py",),
    # error_table: DuckDB quant_errors, exact and estimated rows
    "TABLE_VERSION": (P + "pipeline/error_table_stage.py", P + "error_estimation/*.py", P + "decompose/*.py",
                      P + "quant/codec.py", P + "quant/normal_float.py", P + "quant/config.py", P + "quant/lut.py",
                      P + "quant/batched_error.py", P + "quant/kernels/lq_step.cpp", P + "methods.py"),
    # allocation_plan: DuckDB plans, plan_assignments (the ILP and the budgets)
    "PLAN_VERSION": (P + "allocate/*.py",),
    # decomposed_model: packed Q + L1, L2 per matrix, DuckDB decompositions
    "DECOMPOSITION_VERSION": (P + "surgery/decompose_model.py", P + "decompose/*.py", P + "quant/codec.py",
                              P + "quant/normal_float.py", P + "quant/config.py", P + "quant/matrix.py",
                              P + "quant/bitpack.py", P + "quant/lut.py", P + "quant/kernels/lq_step.cpp"),
    # the saved LQ model's folder layout (checked when it is loaded)
    "FORMAT_VERSION": (P + "quant/matrix.py", P + "quant/bitpack.py"),
    # finetuned_adapters: the trained factors, DuckDB train_steps
    "FINETUNE_VERSION": (P + "training/*.py", P + "surgery/lq_linear.py", P + "surgery/lora_linear.py",
                         P + "surgery/injector.py", P + "surgery/peft_adapter.py", P + "tasks.py", P + "data/encode.py",
                         P + "data/windows.py"),
    # evaluation: DuckDB evaluations (metrics, storage, memory)
    "EVAL_VERSION": (P + "metrics.py", P + "tasks.py", P + "data/encode.py", P + "data/windows.py",
                     P + "memory.py"),
    # exported_model: the written file (GGUF types and bytes, merged weights), DuckDB exports
    "EXPORT_VERSION": (P + "export/ggml_types.py", P + "export/ggml_quant.py", P + "export/gguf_mix.py",
                       P + "export/gguf_export.py", P + "export/hf_to_gguf.py", P + "export/convert_runner.py",
                       P + "export/folders.py", P + "surgery/injector.py", P + "surgery/peft_adapter.py"),
    # comparison_report: the table and plots
    "REPORT_VERSION": (P + "report.py",),
}


def version_constants(root: Path = REPO) -> dict[str, tuple[str, object]]:
    """{NAME: (defining file, value)} of every module-level `*_VERSION = <literal>`."""
    found: dict[str, tuple[str, object]] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.parse(path.read_text()).body:
                name = _version_name(node)
                if name:
                    where = path.relative_to(root).as_posix()
                    if name in found:
                        raise ValueError(f"{name} is defined twice ({found[name][0]}, {where}); keep one")
                    found[name] = (where, ast.literal_eval(node.value))
    return found


def _version_name(node: ast.stmt) -> str | None:
    target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else getattr(node, "target", None)
    if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(target, ast.Name) and target.id.endswith("_VERSION"):
        return target.id
    return None


def normalized(path: Path) -> str:
    """The module's code without docstrings, comments, layout and `*_VERSION` lines, as a
    canonical dump of its syntax tree (no line numbers; empty fields left out, so
    Python versions that add fields agree). A C++ kernel's source counts line by line,
    without its // comments and blank lines."""
    if path.suffix == ".cpp":
        lines = (line.split("//", 1)[0].strip() for line in path.read_text().splitlines())
        return "\n".join(line for line in lines if line)
    tree = ast.parse(path.read_text())
    tree.body = [node for node in tree.body if not _version_name(node)]
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return _canonical(tree)


def _canonical(node) -> str:
    if isinstance(node, ast.AST):
        fields = [(f, getattr(node, f, None)) for f in node._fields]
        inner = ", ".join(f"{f}={_canonical(v)}" for f, v in fields if v is not None and v != [])
        return f"{type(node).__name__}({inner})"
    if isinstance(node, list):
        return "[" + ", ".join(_canonical(n) for n in node) + "]"
    return repr(node)


def covered_files(name: str, defined_in: str, root: Path = REPO) -> list[str]:
    files = {defined_in}
    for pattern in COVERS[name]:
        matched = [p.relative_to(root).as_posix() for p in root.glob(pattern) if p.name != "__init__.py"]
        if not matched:
            raise ValueError(f"{name} covers {pattern}, which matches no file; fix COVERS in tests/versions.py")
        files.update(matched)
    return sorted(files)


def fingerprint(root: Path = REPO) -> dict[str, dict]:
    """{NAME: {value, defined_in, sources: {file: sha256 of its normalized code}}}."""
    lock = {}
    for name, (defined_in, value) in sorted(version_constants(root).items()):
        if name not in COVERS:
            raise ValueError(f"{name} ({defined_in}) is not in COVERS: say in tests/versions.py which source it covers")
        sources = {f: hashlib.sha256(normalized(root / f).encode()).hexdigest() for f in covered_files(name, defined_in, root)}
        lock[name] = {"value": value, "defined_in": defined_in, "sources": sources}
    return lock


def problems(lock: dict[str, dict], now: dict[str, dict]) -> list[str]:
    """What the lock no longer matches, one sentence each."""
    found = []
    for name in sorted(set(lock) | set(now)):
        if name not in lock or name not in now:
            found.append(f"{name} is {'new' if name in now else 'gone'} since the lock; run `{UPDATE}`")
            continue
        old, new = lock[name], now[name]
        files = sorted(f for f in set(old["sources"]) | set(new["sources"])
                       if old["sources"].get(f) != new["sources"].get(f))
        if old["value"] != new["value"]:
            found.append(f"{name} is now {new['value']!r} (the lock has {old['value']!r}): run `{UPDATE}` to record it")
        elif files:
            found.append(
                f"{name}'s source changed (files {', '.join(files)}) but {name} is still {new['value']!r}: "
                f"bump {name} if results change, then run `{UPDATE}`"
            )
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.versions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--update", action="store_true", help="record the current values and sources in the lock")
    parser.add_argument("--root", type=Path, default=REPO, help="the checkout to read (default: this one)")
    args = parser.parse_args(argv)
    now = fingerprint(args.root)
    lock_path = args.root / LOCK.relative_to(REPO)
    if args.update:
        lock_path.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(now)} versions in {lock_path}")
        return 0
    found = problems(json.loads(lock_path.read_text()), now)
    print("\n".join(found) or f"all {len(now)} versions match {lock_path}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
