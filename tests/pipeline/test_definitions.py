"""Definitions load; the sensor registers new models; the schedule finds stale partitions."""

import datetime

import dagster as dg

from assets.automation import build_stale_schedule, new_model_sensor, stale_partitions
from lqlora_dagster.definitions import build_definitions, resources_at
from lqlora_dagster.pipeline.registry import register_model
from lqlora_dagster.store.warehouse import Warehouse


def test_definitions_are_loadable(tmp_path):
    defs = build_definitions(tmp_path)
    dg.Definitions.validate_loadable(defs)
    keys = {k.to_user_string() for k in defs.resolve_all_asset_keys()}
    assert keys >= {"base_model", "calibration_batches", "fisher_diagonals", "error_table", "allocation_plan",
                    "decomposed_model", "finetuned_adapters", "evaluation"}
    job = defs.resolve_job_def("main_job")
    assert job.partitions_def is not None and job.partitions_def.name == "base_models"
    for asset in defs.assets:
        for key, version in asset.code_versions_by_key.items():
            assert version, f"{key} has no code_version"
            assert asset.descriptions_by_key.get(key), f"{key} has no description"


def test_method_package_does_not_import_dagster():
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[2] / "lqlora_dagster"
    offenders = [
        str(p) for p in root.rglob("*.py")
        if p.name != "definitions.py" and re.search(r"^\s*(import dagster|from dagster)", p.read_text(), re.M)
    ]
    assert not offenders


def test_sensor_adds_partitions_for_registered_and_inbox_models(tmp_path, tiny_llama_folder):
    import shutil

    res = resources_at(tmp_path)
    w = Warehouse(tmp_path / "lqlora.duckdb")
    w.init_schema()
    register_model(w, "tiny-a", str(tiny_llama_folder))
    shutil.copytree(tiny_llama_folder, tmp_path / "inbox" / "Tiny-B")
    (tmp_path / "inbox" / "not-a-model").mkdir(parents=True)
    unknown = tmp_path / "inbox" / "unknown-arch"  # checked as `lqlora register` checks: refused
    shutil.copytree(tiny_llama_folder, unknown)
    (unknown / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with dg.instance_for_test() as instance:
        ctx = dg.build_sensor_context(instance=instance, resources={"models": res["models"], "warehouse": res["warehouse"]})
        result = new_model_sensor(ctx)
        assert isinstance(result, dg.SensorResult)
        added = result.dynamic_partitions_requests[0].partition_keys
        assert sorted(added) == ["tiny-a", "tiny-b"]
        assert sorted(r.partition_key for r in result.run_requests) == ["tiny-a", "tiny-b"]
        instance.add_dynamic_partitions("base_models", list(added))
        again = new_model_sensor(dg.build_sensor_context(instance=instance, resources={"models": res["models"], "warehouse": res["warehouse"]}))
        assert isinstance(again, dg.SkipReason)


def test_schedule_requests_stale_partitions(tmp_path):
    versions = {dg.AssetKey("base_model"): "1"}
    schedule = build_stale_schedule(versions)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("base_models", ["fresh", "old", "never"])
        for partition, version in (("fresh", "1"), ("old", "0")):
            instance.report_runless_asset_event(
                dg.AssetMaterialization("base_model", partition=partition, tags={"dagster/code_version": version})
            )
        assert sorted(stale_partitions(instance, versions)) == ["never", "old"]
        when = datetime.datetime(2026, 11, 22, 3, 0, tzinfo=datetime.timezone.utc)
        requests = schedule(dg.build_schedule_context(instance=instance, scheduled_execution_time=when))
        assert {r.run_key for r in requests} == {"stale-never-2026-11-22", "stale-old-2026-11-22"}
        assert sorted(r.partition_key for r in requests) == ["never", "old"]
