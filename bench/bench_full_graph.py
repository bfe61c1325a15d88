"""The main job on one model, every stage timed and measured: the stage rows that run
wrote to DuckDB `stage_runs` (seconds, memory the stage added, the process's peak), the
machine's memory and swap traffic over the run, and the error table's compute per
matrix by shape, from its rows (what `bench_scale.py --seconds` fits and extrapolates),
and what each confirmed plan's confirmation bought against `--no-confirm`.

    python -m bench.bench_full_graph --model llama-1b-shaped [--time-limit S] [-- EXTRA lqlora run FLAGS]
    python -m bench.bench_full_graph --model llama-1b-shaped --report --since 2026-12-01T10:00:00
    python -m bench.bench_full_graph --smoke

The model must be registered in LQLORA_HOME (`lqlora register`); for the 1B-class run:
`python -m bench.make_llama1b_shaped /path/to/llama1b && lqlora register /path/to/llama1b
--name llama-1b-shaped`. Stages already cached are not re-run and have no new row, so
point LQLORA_HOME at a fresh home for a full measurement. With --time-limit the run is
stopped after S seconds and the stages that finished are reported. --smoke runs the whole
job on a tiny Llama built in code, in a temporary home, at the smallest settings."""

import argparse
import datetime
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from bench._common import REPO, add_smoke, save_tiny_llama, stamp

SMOKE_MODEL = "tiny-llama"
SMOKE_RUN = [  # `lqlora run` flags of --smoke: every stage, each at its smallest
    "--in-process", "--grid", "reduced", "--rank", "4", "--max-iters", "3", "--steps", "1",
    "--calibration-sequences", "2", "--calibration-len", "16", "--eval-windows", "1", "--eval-len", "16",
    "--finetune-len", "16", "--finetune-eval-every", "0", "--no-reference",
]


def meminfo() -> dict[str, int]:
    """/proc/meminfo in kB."""
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0])
    return out


def swapped_pages() -> int:
    """Pages swapped in and out since boot."""
    stats = dict(line.split() for line in Path("/proc/vmstat").read_text().splitlines())
    return int(stats.get("pswpin", 0)) + int(stats.get("pswpout", 0))


def stage_rows(home: Path, model: str, since: datetime.datetime):
    from lqlora_dagster.store.warehouse import Warehouse

    return Warehouse(home / "lqlora.duckdb").query(
        "SELECT stage, seconds, added_mb, peak_mb FROM stage_runs WHERE model = ? AND started_at >= ? "
        "ORDER BY started_at",
        [model, since.replace(tzinfo=None)],
        read_only=True,
    )


def matrix_seconds(home: Path, model: str):
    """Seconds of compute per target matrix, summed over its rows in one table (each row
    records its own share), by table and shape: measured per matrix, so it also covers
    rows that an earlier, interrupted run computed. Tables apart, since a fast error
    table and the exact rows its plans' confirmation adds (another table key) are
    different work. The median and the spread, since a matrix computed beside other
    work reads slower."""
    from lqlora_dagster.store.warehouse import Warehouse

    return Warehouse(home / "lqlora.duckdb").query(
        "SELECT q.table_key, any_value(q.table_rows) AS table_rows, m.rows, m.cols, count(*) AS matrices, "
        "median(q.seconds) AS seconds, min(q.seconds) AS fastest, max(q.seconds) AS slowest, "
        "sum(q.seconds) AS total FROM matrices m JOIN "
        "(SELECT table_key, matrix, sum(seconds) AS seconds, "
        "sum(count(*)) OVER (PARTITION BY table_key) AS table_rows "
        "FROM quant_errors WHERE model = ? GROUP BY table_key, matrix) q "
        "ON q.matrix = m.name WHERE m.model = ? GROUP BY q.table_key, m.rows, m.cols "
        "ORDER BY table_rows DESC, q.table_key, m.rows * m.cols",
        [model, model], read_only=True,
    )


def confirmation_gains(home: Path, model: str) -> list[str]:
    """Per confirmed plan (quantized-part budget, one rank): the plan `--no-confirm` would
    have made (solved on the fast table's estimates alone) scored at its picks' exact
    errors, against the confirmed plan's. Exact rows are those of the model's other tables
    with the same init, Fisher weighting and rank (the confirmation's). Why: on a large
    model the confirmation costs hours, and this is what they bought."""
    from lqlora_dagster.methods import get_method
    from lqlora_dagster.store.warehouse import Warehouse

    wh = Warehouse(home / "lqlora.duckdb")
    plans = wh.query("SELECT plan_id, method, budget, objective, table_key FROM plans WHERE model = ? AND "
                     "budget_kind = 'quantized' AND ranks NOT LIKE '%,%' ORDER BY created_at", [model], read_only=True)
    lines = []
    for p in plans.itertuples():
        table = wh.query("SELECT matrix, config, rank, numel, storage_bits, error, init, fisher FROM quant_errors "
                         "WHERE table_key = ?", [p.table_key], read_only=True)
        init, fisher, rank = table["init"].iloc[0], bool(table["fisher"].iloc[0]), int(table["rank"].iloc[0])
        exact = wh.query("SELECT matrix, config, rank, error AS exact FROM quant_errors WHERE model = ? AND "
                         "table_key <> ? AND init = ? AND fisher = ? AND rank = ?",
                         [model, p.table_key, init, fisher, rank], read_only=True)
        if exact.empty:
            continue  # an exhaustive table: its plans are not confirmed
        plain = get_method(p.method).allocation.solve(table[["matrix", "config", "rank", "numel", "storage_bits", "error"]],
                                                     float(p.budget))
        picks = pd.DataFrame(plain.rows(), columns=["matrix", "config", "rank"]).merge(
            exact, on=["matrix", "config", "rank"], how="left")
        confirmed = wh.query("SELECT matrix, config FROM plan_assignments WHERE plan_id = ?", [p.plan_id],
                             read_only=True)
        same = len(picks.merge(confirmed, on=["matrix", "config"]))
        head = f"plan {p.plan_id} ({p.method} @ {p.budget:g}): confirmed, exact error {p.objective:.6g}; "
        if picks["exact"].isna().any():
            lines.append(head + f"`--no-confirm` would pick {picks['exact'].isna().sum()} configs with no exact row")
            continue
        plain_exact = picks["exact"].sum()
        lines.append(head + f"`--no-confirm` would keep {same} of {len(picks)} picks, stated error "
                     f"{plain.objective:.6g}, exact error {plain_exact:.6g} "
                     f"({100 * (plain_exact / p.objective - 1):+.2f}% against the confirmed plan)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model registered in LQLORA_HOME")
    parser.add_argument("--time-limit", type=float, default=None, help="stop the run after this many seconds")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: report the stage rows from --since on (e.g. while a run is going)")
    parser.add_argument("--since", default=None, help="with --report: the UTC time (ISO) the rows start at")
    add_smoke(parser)
    parser.add_argument("extra", nargs="*", help="flags passed on to `lqlora run` (after --)")
    args = parser.parse_args()
    if args.smoke:
        sys.exit(smoke(args))
    if args.model is None:
        parser.error("--model is required (a model registered in LQLORA_HOME)")
    home = Path(os.environ.get("LQLORA_HOME", REPO / ".lqlora")).resolve()
    if args.report:
        if not args.since:
            parser.error("--report needs --since")
        report(home, args.model, datetime.datetime.fromisoformat(args.since))
        return
    print(stamp())
    sys.exit(measure(home, args.model, args.time_limit, args.extra))


def smoke(args) -> int:
    """The whole job on a tiny Llama registered in a temporary home."""
    from lqlora_dagster.cli import main as lqlora

    print(stamp())
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        os.environ["LQLORA_HOME"] = str(home)  # for `lqlora run` too
        if lqlora(["register", str(save_tiny_llama(home / "tiny")), "--name", SMOKE_MODEL]):
            return 1
        return measure(home, SMOKE_MODEL, args.time_limit, [*SMOKE_RUN, *args.extra])


def measure(home: Path, model: str, time_limit: float | None, extra: list[str]) -> int:
    """Run `lqlora run` on `model`, then report; returns its exit code."""
    before, swaps = meminfo(), swapped_pages()
    since = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.perf_counter()
    run = subprocess.Popen([sys.executable, "-m", "lqlora_dagster.cli", "run", "--model", model, *extra],
                           cwd=REPO, start_new_session=True)  # its own group: a stop reaches its step processes
    try:
        run.wait(timeout=time_limit)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGTERM)
        try:
            run.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
        print(f"\nstopped at the time limit of {time_limit:.0f} s")
    wall = time.perf_counter() - t0
    swapped = swapped_pages() - swaps

    print(f"\nmodel {model} in {home}: `lqlora run` exited {run.returncode} after {wall / 3600:.2f} h")
    print(f"machine: {before['MemTotal'] / 2**20:.1f} GiB memory, {before['SwapTotal'] / 2**20:.1f} GiB swap; "
          f"pages swapped in or out during the run: {swapped}")
    report(home, model, since)
    return run.returncode


def report(home: Path, model: str, since: datetime.datetime) -> None:
    """The stage rows from `since` (UTC) on and the error table's compute per matrix."""
    utc = datetime.timezone.utc
    rows = stage_rows(home, model, since.astimezone(utc) if since.tzinfo else since.replace(tzinfo=utc))
    print()
    print("| stage | seconds | added MB | process peak MB |")
    print("|---|---|---|---|")
    for r in rows.itertuples():
        print(f"| {r.stage} | {r.seconds:,.1f} | {r.added_mb:,.0f} | {r.peak_mb:,.0f} |")
    if not rows.empty:
        print(f"| all stages | {rows['seconds'].sum():,.1f} | | {rows['peak_mb'].max():,.0f} |")
    for key, per_matrix in matrix_seconds(home, model).groupby("table_key", sort=False):
        print(f"\ntable {key} ({per_matrix['table_rows'].iloc[0]:,.0f} rows), compute per matrix "
              "(all its rows in this table, one torch thread):\n")
        print("| shape | matrices | median seconds per matrix (fastest-slowest) | µs per weight (median) |")
        print("|---|---|---|---|")
        for r in per_matrix.itertuples():
            print(f"| {r.rows} x {r.cols} | {r.matrices} | {r.seconds:,.1f} ({r.fastest:,.1f}-{r.slowest:,.1f}) | "
                  f"{1e6 * r.seconds / (r.rows * r.cols):.2f} |")
        print(f"\n{per_matrix['matrices'].sum()} matrices, {per_matrix['total'].sum() / 3600:.2f} compute-hours in all")
    print("the table with the most rows is the error table, any other the exact rows its plans' confirmation "
          "computed; fit a curve to the error table's medians with `python -m bench.bench_scale --seconds`")
    gains = confirmation_gains(home, model)
    if gains:
        print("\nwhat the confirmation bought:")
        print("\n".join(gains))


if __name__ == "__main__":
    main()
