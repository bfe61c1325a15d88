"""The bundled default model is a GGUF file, converted to fp32 in the home on first use.
A run's inputs stamp that copy, so they must read the same before the first run as after
it: otherwise the first `lqlora run` in a fresh home never counts as done, and the next
one (a rerun with nothing to compute) launches every step again."""

from lqlora_dagster.definitions import MAIN_JOB
from lqlora_dagster.pipeline.feasibility import model_shape
from lqlora_dagster.pipeline.registry import DEFAULT_MODEL, register_model
from lqlora_dagster.pipeline.run_memo import run_inputs
from lqlora_dagster.store.warehouse import Warehouse


def test_the_default_models_run_inputs_read_the_same_before_and_after_its_first_run(tmp_path):
    warehouse = Warehouse(tmp_path / "lqlora.duckdb")
    register_model(warehouse, DEFAULT_MODEL, DEFAULT_MODEL)
    before = run_inputs(warehouse, tmp_path, DEFAULT_MODEL, MAIN_JOB, {})
    assert any((tmp_path / "models").iterdir())  # the fp32 copy exists from the first stamp on
    model_shape(warehouse, DEFAULT_MODEL, tmp_path / "models")  # what a run's checks and base_model read first
    assert run_inputs(warehouse, tmp_path, DEFAULT_MODEL, MAIN_JOB, {}) == before
