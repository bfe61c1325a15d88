"""Two runs of different partitions at once on one DuckDB file, while a third process
holds the file for a few seconds (a user's `duckdb` shell): both runs succeed, no lock
error reaches anyone, no row is lost."""

import subprocess
import sys
import textwrap

from lqlora_dagster.pipeline.registry import register_model
from lqlora_dagster.store.warehouse import Warehouse
from tests.resilience.runs import Run
from tests.tiny_models import save_tiny_llama

CONFIG = {
    "calibration_batches": {"config": {"n_sequences": 4, "seq_len": 64}},
    "error_table": {"config": {"methods": ["lqlora", "qlora-ilp"], "rank": 4, "grid": "reduced"}},
    "allocation_plan": {"config": {"budgets": [3.0, 3.5]}},
}


def test_two_partitions_at_once_on_one_duckdb_file(tmp_path, tiny_llama_folder):
    home = tmp_path / "home"
    w = Warehouse(home / "lqlora.duckdb")
    w.init_schema()
    register_model(w, "tiny", str(tiny_llama_folder))
    register_model(w, "tiny-b", str(save_tiny_llama(tmp_path / "tiny-b", seed=1)))

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import duckdb, time
                con = duckdb.connect({str(home / "lqlora.duckdb")!r})
                print("holding", flush=True)
                time.sleep(20)
                con.close()
                print(time.monotonic(), flush=True)
            """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "holding"
    runs = [Run(home, "allocation_plan", CONFIG, partition=p) for p in ("tiny", "tiny-b")]
    codes = [r.finish() for r in runs]
    assert holder.wait(timeout=60) == 0
    released = float(holder.stdout.readline())
    for run, code in zip(runs, codes):
        assert code == 0, run.log_tail()
        assert not run.matching(r"(?i)lock"), run.log_tail()
        # the runs really waited for the holder: base_model could only write after it let go
        (done_at, _), *_ = run.matching(r"base_model - STEP_SUCCESS")
        assert done_at > released

    w = Warehouse(home / "lqlora.duckdb")
    for model in ("tiny", "tiny-b"):
        n = w.query(
            "SELECT (SELECT count(*) FROM matrices WHERE model = $m) AS matrices, "
            "(SELECT count(*) FROM quant_errors WHERE model = $m "
            " AND table_key IN (SELECT table_key FROM plans WHERE model = $m)) AS errors, "
            "(SELECT count(*) FROM quant_errors WHERE model = $m "
            " AND table_key NOT IN (SELECT table_key FROM plans WHERE model = $m)) AS confirmed, "
            "(SELECT count(*) FROM plans WHERE model = $m) AS plans, "
            "(SELECT count(*) FROM calibration WHERE model = $m) AS calibration",
            {"m": model},
        ).iloc[0]
        # 14 matrices; two tables (lqlora, qlora-ilp) of the 24 reduced configs; 2 methods x 2 budgets
        assert (n["matrices"], n["plans"], n["calibration"]) == (14, 4, 1), (model, n.to_dict())
        assert n["errors"] == 14 * 24 * 2, (model, n.to_dict())
        # lqlora's plans (fast table) were confirmed: exact rows under the exhaustive key
        assert 14 <= n["confirmed"] < 14 * 24, (model, n.to_dict())
    dupes = w.query(
        "SELECT count(*) - count(DISTINCT (table_key, matrix, config)) AS d FROM quant_errors"
    )["d"].iloc[0]
    assert dupes == 0
