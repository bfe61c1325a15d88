"""Asset checks in a run of one partition while other partitions exist: Dagster hands
an (unpartitioned) check every partition of its asset; it must check the run's own."""

import os

import dagster as dg

from lqlora_dagster.definitions import build_definitions, resources_at
from lqlora_dagster.pipeline.registry import register_model
from lqlora_dagster.store.warehouse import Warehouse


def test_checks_pass_with_two_partitions(tmp_path, tiny_llama_folder, monkeypatch):
    monkeypatch.setenv("LQLORA_HOME", str(tmp_path))
    w = Warehouse(tmp_path / "lqlora.duckdb")
    w.init_schema()
    for name in ("tiny-a", "tiny-b"):
        register_model(w, name, str(tiny_llama_folder))
    defs = build_definitions(tmp_path)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("base_models", ["tiny-a", "tiny-b"])
        for partition in ("tiny-b", "tiny-a"):  # each run checks its own partition
            result = dg.materialize(
                list(defs.assets) + list(defs.asset_checks or []),
                instance=instance,
                partition_key=partition,
                resources=resources_at(tmp_path),
                run_config={"ops": {"calibration_batches": {"config": {"n_sequences": 2, "seq_len": 32}}}},
                selection=dg.AssetSelection.assets("base_model", "task_data", "calibration_batches", "fisher_diagonals"),
                raise_on_error=False,
            )
            assert result.success and not result.get_step_failure_events()
            checks = result.get_asset_check_evaluations()
            assert {c.check_name for c in checks} >= {"targets_recorded", "fisher_is_sane"}
            assert all(c.passed for c in checks), [(c.check_name, c.metadata) for c in checks]
    assert os.environ["LQLORA_HOME"] == str(tmp_path)
