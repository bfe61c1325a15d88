"""`lqlora`: the jobs users repeat, from a terminal.

    lqlora register SOURCE [--name NAME] [--pattern REGEX]   add a base model (a partition)
    lqlora run [--model M] [--budget 2.75 ...] [...]         materialize the whole graph
    lqlora compare [--model M]                               every method at the paper's budgets
    lqlora unregister NAME                                   forget a registered model
    lqlora sql QUERY [--model M]                             run a canned query (sql/queries)
    lqlora models                                            list registered models
    lqlora ui [--port 3000]                                  the Dagster UI on this project

Exit codes: 0 success, 1 a run failed, 2 bad input (the message says what to do).
"""

import argparse
import sys
from pathlib import Path

from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.methods import METHODS
from lqlora_dagster.pipeline.context import default_home, ensure_writable_home
from lqlora_dagster.pipeline.registry import (
    DEFAULT_MODEL,
    check_model_name,
    lookup_model,
    register_model,
    registered_models,
    unregister_model,
)
from lqlora_dagster.pipeline.settings import (
    DEFAULT_CONFIRM_MARGIN,
    CalibrationSettings,
    ErrorTableSettings,
    EvalSettings,
    FinetuneSettings,
    PlanSettings,
)
from lqlora_dagster.store.artifacts import ArtifactStore
from lqlora_dagster.store.warehouse import SQL_DIR, Warehouse


def _warehouse(home: Path) -> Warehouse:
    w = Warehouse(home / "lqlora.duckdb")
    w.init_schema()
    return w


def check_run_args(args: argparse.Namespace) -> None:
    """Every setting checked before a run starts: a typo fails in a second, not an hour in."""
    CalibrationSettings(n_sequences=args.calibration_sequences, seq_len=args.calibration_len)
    ErrorTableSettings(methods=tuple(args.methods), rank=args.rank, grid=args.grid, fast=not args.exhaustive)
    PlanSettings(budgets=tuple(args.budget), confirm_margin=None if args.no_confirm else args.confirm_margin)
    FinetuneSettings(steps=args.steps)
    EvalSettings(seq_len=args.eval_len, n_windows=args.eval_windows)


def _run_config(args: argparse.Namespace) -> dict:
    ops = {
        "calibration_batches": {
            "config": {"n_sequences": args.calibration_sequences, "seq_len": args.calibration_len}
        },
        "error_table": {
            "config": {
                "methods": args.methods,
                "rank": args.rank,
                "grid": args.grid,
                "fast": not args.exhaustive,
            }
        },
        "allocation_plan": {
            "config": {
                "budgets": args.budget,
                "confirm": not args.no_confirm,
                "confirm_margin": args.confirm_margin,
            }
        },
        "finetuned_adapters": {"config": {"steps": args.steps}},
        "evaluation": {"config": {"n_windows": args.eval_windows, "seq_len": args.eval_len}},
    }
    return {"ops": ops}


def cmd_register(args: argparse.Namespace, home: Path) -> int:
    from lqlora_dagster.definitions import add_partition, prepare_dagster_home

    name = args.name or (args.source if "/" not in args.source else Path(args.source).name.lower())
    added = register_model(_warehouse(home), name, args.source, args.pattern)
    prepare_dagster_home(home)
    add_partition(name)
    print(f"registered {name!r} from {args.source}" if added else f"{name!r} was already registered")
    return 0


def _ensure_model(warehouse: Warehouse, model: str) -> None:
    """The bundled default registers itself; any other model must be registered first."""
    if model == DEFAULT_MODEL:
        register_model(warehouse, DEFAULT_MODEL, DEFAULT_MODEL)
    elif model not in set(registered_models(warehouse)["model"]):
        raise LQLoRAInputError(f"model {model!r} is not registered; run `lqlora register SOURCE --name {model}`")


def _run_job(args: argparse.Namespace, home: Path, run_config: dict, job: str | None = None) -> bool:
    from lqlora_dagster.definitions import MAIN_JOB, add_partition, prepare_dagster_home, run_main_job

    prepare_dagster_home(home)
    add_partition(args.model)
    print(f"running {job or MAIN_JOB} for {args.model!r} (LQLORA_HOME={home})", flush=True)
    ok = run_main_job(args.model, run_config, multiprocess=not args.in_process, job=job or MAIN_JOB)
    if not ok:
        print("the run failed; see the log above or the Dagster UI (lqlora ui)", file=sys.stderr)
    return ok


def cmd_run(args: argparse.Namespace, home: Path) -> int:
    check_run_args(args)
    _ensure_model(_warehouse(home), args.model)
    if not _run_job(args, home, _run_config(args)):
        return 1
    table = _warehouse(home).run_named_query("ppl_by_method_and_budget", {"model": args.model})
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0


def cmd_compare(args: argparse.Namespace, home: Path) -> int:
    """The comparison job: every method at the paper's budgets, then the report."""
    from lqlora_dagster.comparison import ComparisonSettings
    from lqlora_dagster.definitions import COMPARISON_JOB, comparison_run_config, stored_handle

    warehouse = _warehouse(home)
    _ensure_model(warehouse, args.model)
    given = {"rank": args.rank, "finetune_steps": args.steps, "eval_windows": args.eval_windows,
             "eval_len": args.eval_len}
    overrides = {k: v for k, v in given.items() if v is not None}
    if lookup_model(warehouse, args.model)["task"] == "seq-cls":
        settings = ComparisonSettings.encoder(**overrides)
    else:
        settings = ComparisonSettings(**overrides)
    if not _run_job(args, home, comparison_run_config(settings), COMPARISON_JOB):
        return 1
    report = stored_handle(home, "comparison_report", args.model)
    folder = ArtifactStore(home / "artifacts").get("comparison_report", args.model, report.key).path
    print((folder / "comparison.md").read_text())
    print(f"plots: {folder}/")
    return 0


def cmd_unregister(args: argparse.Namespace, home: Path) -> int:
    """Forget a model (its partition and registry row); stored results stay in DuckDB."""
    from lqlora_dagster.definitions import prepare_dagster_home, remove_partition

    check_model_name(args.name)
    warehouse = _warehouse(home)
    if args.name not in set(registered_models(warehouse)["model"]):
        raise LQLoRAInputError(f"model {args.name!r} is not registered; `lqlora models` lists them")
    unregister_model(warehouse, args.name)
    prepare_dagster_home(home)
    remove_partition(args.name)
    print(f"unregistered {args.name!r}")
    return 0


def cmd_sql(args: argparse.Namespace, home: Path) -> int:
    """Read-only when the warehouse exists, so a shared or write-protected file still answers."""
    path = home / "lqlora.duckdb"
    if path.is_file():
        frame = Warehouse(path).run_named_query(args.query, {"model": args.model}, read_only=True)
    else:
        frame = _warehouse(home).run_named_query(args.query, {"model": args.model})
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.4g}") if not frame.empty else "(no rows)")
    return 0


def cmd_models(args: argparse.Namespace, home: Path) -> int:
    print(registered_models(_warehouse(home)).to_string(index=False))
    return 0


def cmd_ui(args: argparse.Namespace, home: Path) -> int:
    """`dagster dev` on this project, with DAGSTER_HOME under LQLORA_HOME."""
    import os
    import subprocess

    from lqlora_dagster.definitions import prepare_dagster_home

    prepare_dagster_home(home)
    repo = Path(__file__).resolve().parents[1]
    cmd = [str(Path(sys.executable).with_name("dagster")), "dev", "-w", str(repo / "workspace.yaml"),
           "-h", args.host, "-p", str(args.port)]
    print(f"Dagster UI on http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    proc = subprocess.Popen(cmd, cwd=repo, env=os.environ.copy(), start_new_session=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        os.killpg(proc.pid, 15)
        return proc.wait()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lqlora", description=__doc__.split("\n\n")[0])
    p.add_argument("--home", type=Path, default=None, help="LQLORA_HOME (default: $LQLORA_HOME or ./.lqlora)")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("register", help="register a base model as a new partition")
    r.add_argument("source", help=f"a bundled model ({DEFAULT_MODEL}, minilm-l6) or a local HF folder")
    r.add_argument("--name", help="partition key (default: the folder name)")
    r.add_argument("--pattern", help="regex over module names selecting the target layers")
    r.set_defaults(func=cmd_register)

    run = sub.add_parser("run", help="materialize the whole asset graph for one model")
    run.add_argument("--model", default=DEFAULT_MODEL)
    run.add_argument("--budget", type=float, nargs="+", default=[3.25], help="bits/param; one plan each")
    run.add_argument("--methods", nargs="+", default=["lqlora-fisher"], choices=list(METHODS))
    run.add_argument("--rank", type=int, default=16)
    run.add_argument("--grid", choices=["full", "reduced"], default="full")
    run.add_argument(
        "--exhaustive", action="store_true", help="one decomposition per config (slow reference)"
    )
    run.add_argument(
        "--confirm-margin",
        type=float,
        default=DEFAULT_CONFIRM_MARGIN,
        help="plans on the fast table: estimates count this much lower until picked and computed exactly",
    )
    run.add_argument("--no-confirm", action="store_true", help="plan on the fast table's estimates as they are")
    run.add_argument("--calibration-sequences", type=int, default=32)
    run.add_argument("--calibration-len", type=int, default=256)
    run.add_argument("--steps", type=int, default=20, help="finetuning steps")
    run.add_argument("--eval-windows", type=int, default=16)
    run.add_argument("--eval-len", type=int, default=512)
    run.add_argument(
        "--in-process", action="store_true", help="run steps in this process (no multiprocess executor)"
    )
    run.set_defaults(func=cmd_run)

    c = sub.add_parser(
        "compare",
        help="compare every method at the paper's budgets (table and plots); SmolLM2 about 1.5 h on 2 cores, "
        "MiniLM (register minilm-l6) on sentence polarity in minutes",
    )
    c.add_argument("--model", default=DEFAULT_MODEL)
    c.add_argument("--rank", type=int, help="default 16")
    c.add_argument("--steps", type=int, help="finetuning steps, the same for every method (LM 10, encoder 200)")
    c.add_argument("--eval-windows", type=int, help="perplexity windows (LM, default 8)")
    c.add_argument("--eval-len", type=int, help="tokens per window or sentence (LM 512, encoder 64)")
    c.add_argument("--in-process", action="store_true", help="run steps in this process")
    c.set_defaults(func=cmd_compare)

    u = sub.add_parser("unregister", help="forget a registered model (its results stay in DuckDB)")
    u.add_argument("name")
    u.set_defaults(func=cmd_unregister)

    q = sub.add_parser("sql", help="run a canned query from sql/queries")
    known = sorted(f.stem for f in (SQL_DIR / "queries").glob("*.sql"))
    q.add_argument("query", help=f"one of: {', '.join(known)}")
    q.add_argument("--model", default=DEFAULT_MODEL)
    q.set_defaults(func=cmd_sql)

    m = sub.add_parser("models", help="list registered models")
    m.set_defaults(func=cmd_models)

    ui = sub.add_parser("ui", help="open the Dagster UI (dagster dev) for this project")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=3000)
    ui.set_defaults(func=cmd_ui)
    return p


def main(argv: list[str] | None = None) -> int:
    import os

    args = parser().parse_args(argv)
    home = (args.home or default_home()).resolve()
    os.environ["LQLORA_HOME"] = str(home)  # the Dagster code (and its subprocesses) read it
    try:
        if args.command != "sql":
            ensure_writable_home(home)
        return args.func(args, home)
    except LQLoRAInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
