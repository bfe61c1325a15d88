"""Carry a long benchmark run's measured rows from one machine to the next: the error
table rows (`quant_errors`) and the stage timings (`stage_runs`) of one model, out of a
LQLORA_HOME's DuckDB into parquet files and back into a fresh home.

Why: the 1B-class run (`bench_full_graph.py --model llama-1b-shaped`) takes longer than
one of our sessions, and a session's machine does not outlive it. The pipeline resumes
the error table matrix by matrix from the rows in DuckDB, and its keys hash the model's
weights and the settings, not the machine: the same model rebuilt from the same seed
(`make_llama1b_shaped.py`) picks the carried rows up and computes only the rest.

    python bench/carry_rows.py export --model llama-1b-shaped OUT_FOLDER
    python bench/carry_rows.py import OUT_FOLDER      # into LQLORA_HOME, after `lqlora register`
"""

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TABLES = {"quant_errors": ["table_key", "matrix", "config"], "stage_runs": ["model", "stage", "started_at"]}


def warehouse():
    from lqlora_dagster.store.warehouse import Warehouse

    home = Path(os.environ.get("LQLORA_HOME", REPO / ".lqlora")).resolve()
    return Warehouse(home / "lqlora.duckdb")


def export(model: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    wh = warehouse()
    for table in TABLES:
        frame = wh.query(f"SELECT * FROM {table} WHERE model = ?", [model], read_only=True)
        frame.to_parquet(out / f"{table}.parquet", index=False)
        print(f"{table}: {len(frame):,} rows of {model} -> {out / (table + '.parquet')}")


def import_rows(folder: Path) -> None:
    import pandas as pd

    wh = warehouse()  # the rows came out of the same schema, which DuckDB enforces again on insert
    for table, keys in TABLES.items():
        frame = pd.read_parquet(folder / f"{table}.parquet")
        print(f"{table}: {wh.upsert(table, frame, keys):,} rows from {folder}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="action", required=True)
    e = sub.add_parser("export")
    e.add_argument("--model", required=True)
    e.add_argument("out", type=Path)
    i = sub.add_parser("import")
    i.add_argument("folder", type=Path)
    args = p.parse_args()
    if args.action == "export":
        export(args.model, args.out)
    else:
        import_rows(args.folder)


if __name__ == "__main__":
    main()
