"""The model registry: which base models the pipeline knows (DuckDB `models`).

A registered model is a Dagster partition. Registering validates the source first,
so a typo fails here with a message instead of in the middle of a run.
"""

import re

import duckdb
import pandas as pd

from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.models.source import parse_source
from lqlora_dagster.store.warehouse import Warehouse

DEFAULT_MODEL = "smollm2-135m"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


def check_model_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise LQLoRAInputError(
            f"model name {name!r} is not a valid partition key: use 1-63 lowercase letters, digits, '.', '_' or '-'"
        )
    return name


def describe_source(source: str) -> tuple[str, str]:
    """(normalised source, task) for a bundled name, an HF folder, a .gguf file or a hub
    id; the normalised source resolves again to the same model (`resolve_model_folder`)."""
    parsed = parse_source(source)
    return parsed.key, parsed.task


def register_model(warehouse: Warehouse, name: str, source: str, pattern: str | None = None) -> bool:
    """Add a model; returns False if the same registration already exists."""
    check_model_name(name)
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as err:
            raise LQLoRAInputError(f"target pattern {pattern!r} is not a valid regex: {err}") from err
    normalised, task = describe_source(source)
    warehouse.init_schema()
    frame = pd.DataFrame([{"model": name, "source": normalised, "task": task, "pattern": pattern}])
    while not insert_new(warehouse, "models", frame):
        existing = warehouse.query("SELECT source, pattern FROM models WHERE model = ?", [name])
        if existing.empty:  # unregistered between the two statements: try again
            continue
        row = existing.iloc[0]
        if row["source"] == normalised and (row["pattern"] if pd.notna(row["pattern"]) else None) == pattern:
            return False
        raise LQLoRAInputError(
            f"model {name!r} is already registered from {row['source']}; pick another name "
            "or unregister it first (`lqlora unregister NAME`)"
        )
    return True


def insert_new(warehouse: Warehouse, table: str, frame: pd.DataFrame) -> bool:
    """Insert the rows unless one of their primary keys is taken (then nothing, False).
    The check is the INSERT's own key constraint, so of two processes registering one
    name at once exactly one wins; a look-up first and a write after would let both."""
    with warehouse.connect() as con:
        con.register("_new_rows", frame)
        cols = ", ".join(f'"{c}"' for c in frame.columns)
        try:
            con.execute(f'INSERT INTO "{table}" ({cols}) SELECT {cols} FROM _new_rows')
        except duckdb.ConstraintException:
            return False
        finally:
            con.unregister("_new_rows")
    return True


def unregister_model(warehouse: Warehouse, name: str) -> None:
    warehouse.init_schema()
    warehouse.replace_rows("models", pd.DataFrame(), {"model": name})


def registered_models(warehouse: Warehouse) -> pd.DataFrame:
    warehouse.init_schema()
    return warehouse.query("SELECT model, source, task, pattern FROM models ORDER BY model")


def lookup_model(warehouse: Warehouse, name: str) -> dict:
    models = registered_models(warehouse)
    row = models[models["model"] == name]
    if row.empty:
        known = ", ".join(models["model"]) or "none yet"
        raise LQLoRAInputError(
            f"unknown model partition {name!r} (registered: {known}); register it with `lqlora register SOURCE --name {name}`"
        )
    record = row.iloc[0].to_dict()
    record["pattern"] = record["pattern"] if pd.notna(record["pattern"]) else None
    return record
