"""The cluster path with a real engine on one machine: the error table of a tiny model
materialized through dagster-dask's executor on a local Dask cluster (2 worker
processes) gives the same rows as the in-process executor."""

from pathlib import Path

import dagster as dg
import pandas as pd

from assets.error_table import N_CHUNKS
from lqlora_dagster.definitions import reconstructable_job
from lqlora_dagster.pipeline.registry import register_model
from lqlora_dagster.store.warehouse import Warehouse
from tests.pipeline.conftest import tiny_run_config

MODEL = "tiny-llama"
UPSTREAM = ["base_model", "task_data", "calibration_batches", "fisher_diagonals", "error_table"]


def error_rows(home: Path, tiny_llama_folder: Path, executor: str, execution: dict | None) -> pd.DataFrame:
    w = Warehouse(home / "lqlora.duckdb")
    w.init_schema()
    register_model(w, MODEL, str(tiny_llama_folder))
    # the unweighted LQ table: its rows depend only on the weights (a Fisher estimate
    # computed under another thread count differs in the last bits and the LQ
    # iteration amplifies that), so the two executors must agree to float precision
    ops = tiny_run_config(methods=("lqlora",))["ops"]
    run_config = {"ops": {k: ops[k] for k in ("calibration_batches", "error_table")}}
    if execution:
        run_config["execution"] = execution
    (home / "dagster").mkdir(parents=True)
    # no compute-log capture: in a Dask worker the `tail -F` it starts per step ignores
    # SIGTERM, so every step waited out dagster's 30 s clean-up timeout (13 min a run)
    no_capture = {"compute_logs": {"module": "dagster._core.storage.noop_compute_log_manager",
                                   "class": "NoOpComputeLogManager"}}
    with dg.instance_for_test(temp_dir=str(home / "dagster"), overrides=no_capture) as instance:
        instance.add_dynamic_partitions("base_models", [MODEL])
        result = dg.execute_job(
            reconstructable_job(home, executor),
            instance=instance,
            run_config=run_config,
            tags={"dagster/partition": MODEL},
            asset_selection=[dg.AssetKey(k) for k in UPSTREAM],
        )
        assert result.success
        succeeded = instance.all_logs(result.run_id, of_type=dg.DagsterEventType.STEP_SUCCESS)
        steps = {e.dagster_event.step_key for e in succeeded}
    # every chunk step and the fan-in ran (a skipped step would leave the run "successful")
    expected = {f"error_table.error_table_chunk_{i}" for i in range(N_CHUNKS)} | {
        "error_table.error_table_summary"
    }
    assert expected <= steps
    rows = w.query("SELECT matrix, config, error, storage_bits FROM quant_errors ORDER BY matrix, config")
    assert len(rows) == 14 * 24  # 2 layers x 7 matrices, reduced grid
    return rows


def test_error_table_on_local_dask_cluster_matches_in_process(tmp_path, tiny_llama_folder):
    from distributed import LocalCluster

    reference = error_rows(tmp_path / "in_process", tiny_llama_folder, "in_process", None)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        execution = {"config": {"cluster": {"existing": {"address": cluster.scheduler_address}}}}
        on_dask = error_rows(tmp_path / "dask", tiny_llama_folder, "dask", execution)
        workers = len(cluster.scheduler_info["workers"])
    assert workers == 2
    pd.testing.assert_frame_equal(on_dask, reference, rtol=1e-6)
