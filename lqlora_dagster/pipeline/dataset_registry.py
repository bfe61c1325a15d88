"""The dataset registry (DuckDB `datasets`) and the `task_data` stage that picks a run's data.

`lqlora data add` checks a file completely (`data/datasets.py`) before its row is
written, so a bad file never reaches the store; the row is written by one INSERT whose
key constraint refuses a name another process registered meanwhile. A run names datasets; `task_data`
re-reads their checksums, so an edited file gets a new content id and exactly the
stages that read it run again.
"""

import re
from pathlib import Path

import pandas as pd

from lqlora_dagster.data.datasets import Columns, DatasetSpec, inspect_dataset
from lqlora_dagster.data.files import Reading, checksum
from lqlora_dagster.data.selection import BUILTIN, TaskData
from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.pipeline.handles import ModelHandle
from lqlora_dagster.pipeline.registry import insert_new
from lqlora_dagster.pipeline.settings import DataSettings
from lqlora_dagster.store.warehouse import Warehouse
from lqlora_dagster.tasks import task_for_data

DATA_VERSION = "1"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
DEFAULT_DATA = {"causal-lm": "sotu", "seq-cls": "polarity"}  # per model kind


def add_dataset(warehouse: Warehouse, name: str, path: str, task: str | None = None,
                named: Columns = Columns(), replace: bool = False, reading: Reading = Reading()) -> DatasetSpec:
    """Check and register a dataset; the same name twice needs `replace`."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise LQLoRAInputError(f"dataset name {name!r}: use 1-63 lowercase letters, digits, '.', '_' or '-'")
    if name in BUILTIN:
        raise LQLoRAInputError(f"{name!r} is a bundled dataset; pick another name")
    warehouse.init_schema()
    taken = f"dataset {name!r} is already registered; pass --replace to point it at {path}"
    if not replace and not warehouse.query("SELECT 1 FROM datasets WHERE name = ?", [name]).empty:
        raise LQLoRAInputError(taken)  # early, before reading the file; the INSERT below decides
    spec = inspect_dataset(name, path, task, named, reading)
    frame = pd.DataFrame([spec.record()])
    if replace:
        warehouse.upsert("datasets", frame, ["name"])
    elif not insert_new(warehouse, "datasets", frame):
        raise LQLoRAInputError(f"{taken} (another command registered it while this one read the file)")
    return spec


def remove_dataset(warehouse: Warehouse, name: str) -> None:
    """Forget a registered dataset; the bundled ones ship with the package and stay."""
    if name in BUILTIN:
        raise LQLoRAInputError(
            f"{name!r} is a bundled dataset: it ships with lqlora and cannot be removed; `lqlora data remove` "
            "forgets datasets added with `lqlora data add`"
        )
    warehouse.init_schema()
    gone = warehouse.query("DELETE FROM datasets WHERE name = ? RETURNING name", [name])
    if gone.empty:
        added = ", ".join(registered_datasets(warehouse)["name"]) or "none"
        raise LQLoRAInputError(
            f"no dataset {name!r} is registered (added: {added}; bundled, not removable: {', '.join(sorted(BUILTIN))}); "
            "`lqlora data list` shows them"
        )


def registered_datasets(warehouse: Warehouse) -> pd.DataFrame:
    warehouse.init_schema()
    return warehouse.query("SELECT name, task, format, rows, labels, path, sha256 FROM datasets ORDER BY name")


def lookup_dataset(warehouse: Warehouse, name: str) -> DatasetSpec:
    if name in BUILTIN:
        return BUILTIN[name]
    warehouse.init_schema()
    rows = warehouse.query("SELECT * FROM datasets WHERE name = ?", [name])
    if rows.empty:
        known = ", ".join(sorted(registered_datasets(warehouse)["name"]) + sorted(BUILTIN))
        raise LQLoRAInputError(f"unknown dataset {name!r} (known: {known}); add it with `lqlora data add {name} PATH`")
    return DatasetSpec.from_record(rows.iloc[0].to_dict())


def current(warehouse: Warehouse, spec: DatasetSpec, log=print) -> DatasetSpec:
    """The spec of the file as it is now: re-checked and re-registered when its bytes changed."""
    if spec.format == "builtin" or checksum(Path(spec.path), spec.reading) == spec.sha256:
        return spec
    fresh = inspect_dataset(spec.name, spec.path, spec.task, spec.use, spec.reading)
    warehouse.upsert("datasets", pd.DataFrame([fresh.record()]), ["name"])
    log(f"dataset {spec.name!r} changed since it was registered ({spec.rows} -> {fresh.rows} rows); using the new file")
    return fresh


def check_data(warehouse: Warehouse, s: DataSettings, model: str, model_kind: str) -> None:
    """Every dataset a run names is registered and fits the model (checked before any work)."""
    for role in ("train", "val", "eval", "calibration"):
        if getattr(s, role):
            spec = lookup_dataset(warehouse, getattr(s, role))
            task_for_data(spec.task, model_kind, spec.name, model)


def select_data(warehouse: Warehouse, model: ModelHandle, s: DataSettings, log=print) -> TaskData:
    """The run's datasets, checked against each other and against the model."""
    train_name = s.train or DEFAULT_DATA[model.task]
    train = current(warehouse, lookup_dataset(warehouse, train_name), log)
    task_for_data(train.task, model.task, train.name, model.model)
    chosen = {}
    for role in ("val", "eval", "calibration"):
        name = getattr(s, role)
        if not name:
            continue
        spec = current(warehouse, lookup_dataset(warehouse, name), log)
        if role == "calibration":  # any data the model reads will do for the Fisher weights
            task_for_data(spec.task, model.task, spec.name, model.model)
            if train.task == "classify" and spec.task == "classify" and not set(spec.labels) <= set(train.labels):
                raise LQLoRAInputError(f"calibration dataset {name!r} has labels the training data lacks")
        elif spec.task != train.task:
            raise LQLoRAInputError(
                f"{role} dataset {name!r} is {spec.task} data, the training dataset {train.name!r} is {train.task}; "
                "use datasets of one task"
            )
        if role != "calibration" and train.task == "classify" and not set(spec.labels) <= set(train.labels):
            extra = sorted(set(spec.labels) - set(train.labels))
            raise LQLoRAInputError(f"{role} dataset {name!r} has labels the training data lacks: {extra}")
        chosen[role] = spec
    return TaskData(
        train.task, train, chosen.get("calibration", train), chosen.get("val"), chosen.get("eval"),
        s.val_fraction, s.test_fraction, s.split_seed,
    )
