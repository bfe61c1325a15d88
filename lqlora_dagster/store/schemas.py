"""Pandera schemas: every frame is validated before it is written to the warehouse,
so a NaN error or a config outside the grid never reaches the ILP or a user's SQL.

Each schema is named after its DuckDB table (sql/schema.sql); tests/store/test_schema.py
checks that both agree on columns, types and nullability, and that each stage validates
what it writes."""

import numpy as np
import pandas as pd
import pandera.pandas as pa

from lqlora_dagster.decompose.inits import INITS
from lqlora_dagster.quant.config import SCALE_FORMATS

_finite_nonneg = [pa.Check.ge(0), pa.Check(lambda s: np.isfinite(s.astype(float)), error="finite")]
_config_columns = {
    "config": pa.Column(str),
    "b": pa.Column(int, pa.Check.isin([2, 3, 4, 8])),
    "b0": pa.Column(int, pa.Check.isin([2, 3, 4, 8])),
    "b1": pa.Column(str, pa.Check.isin(sorted(SCALE_FORMATS))),
    "block_size": pa.Column(int, pa.Check.gt(0)),
    "group_size": pa.Column(int, pa.Check.gt(0)),
}

MATRICES = pa.DataFrameSchema(
    name="matrices",
    columns={
        "model": pa.Column(str),
        "name": pa.Column(str),
        "kind": pa.Column(str),
        "layer": pa.Column(int, pa.Check.ge(-1)),
        "rows": pa.Column(int, pa.Check.gt(0)),
        "cols": pa.Column(int, pa.Check.gt(0)),
        "numel": pa.Column(int, pa.Check.gt(0)),
        "transposed": pa.Column(bool),
        "position": pa.Column(int, pa.Check.ge(0)),
    },
    unique=["model", "name"],
    strict=True,
)

QUANT_ERRORS = pa.DataFrameSchema(
    name="quant_errors",
    columns={
        "table_key": pa.Column(str),
        "model": pa.Column(str),
        "init": pa.Column(str, pa.Check.isin(sorted({init.name for init in INITS.values()}))),
        "matrix": pa.Column(str),
        **_config_columns,
        "rank": pa.Column(int, pa.Check.ge(0)),
        "fisher": pa.Column(bool),
        "bits_per_param": pa.Column(float, pa.Check.gt(0)),
        "storage_bits": pa.Column(int, pa.Check.gt(0)),
        "numel": pa.Column(int, pa.Check.gt(0)),
        "error": pa.Column(float, _finite_nonneg),
        "iters": pa.Column(int, pa.Check.ge(0)),
        "seconds": pa.Column(float, pa.Check.ge(0)),
    },
    unique=["table_key", "matrix", "config"],
    strict=True,
)

PLANS = pa.DataFrameSchema(
    name="plans",
    columns={
        "plan_id": pa.Column(str, unique=True),
        "model": pa.Column(str),
        "method": pa.Column(str),
        "budget": pa.Column(float, pa.Check.gt(0)),
        "table_key": pa.Column(str),
        "objective": pa.Column(float, _finite_nonneg),
        "bound": pa.Column(float),
        "gap": pa.Column(float, pa.Check.ge(0)),
        "status": pa.Column(str),
        "solve_s": pa.Column(float, pa.Check.ge(0)),
        "bits_per_param": pa.Column(float, pa.Check.gt(0)),
        "budget_kind": pa.Column(str, pa.Check.isin(["quantized", "lowrank", "total"])),
        "ranks": pa.Column(str),
        "factor_bits": pa.Column(int, pa.Check.in_range(1, 32)),
        "bits_with_lowrank": pa.Column(float, pa.Check.gt(0)),
        "total_bytes": pa.Column(int, pa.Check.gt(0)),
    },
    checks=pa.Check(
        lambda df: pd.Series(
            [
                (b if k == "quantized" else lr if k == "lowrank" else t) <= budget * (1 + 1e-9)
                for b, lr, t, k, budget in zip(
                    df["bits_per_param"], df["bits_with_lowrank"], df["total_bytes"], df["budget_kind"], df["budget"]
                )
            ],
            index=df.index,
        ),
        error="plan exceeds its budget",
    ),
    strict=True,
)

PLAN_ASSIGNMENTS = pa.DataFrameSchema(
    name="plan_assignments",
    columns={
        "plan_id": pa.Column(str),
        "matrix": pa.Column(str),
        **_config_columns,
        "rank": pa.Column(int, pa.Check.ge(0)),
        "bits_per_param": pa.Column(float, pa.Check.gt(0)),
        "error": pa.Column(float, _finite_nonneg),
    },
    unique=["plan_id", "matrix"],
    strict=True,
)

TRAIN_STEPS = pa.DataFrameSchema(
    name="train_steps",
    columns={
        "run": pa.Column(str),
        "plan_id": pa.Column(str),
        "step": pa.Column(int, pa.Check.ge(1)),
        "loss": pa.Column(float, _finite_nonneg),
        "lr": pa.Column(float, pa.Check.ge(0)),
        "seconds": pa.Column(float, pa.Check.ge(0)),
        "val_loss": pa.Column(float, nullable=True, coerce=True),
    },
    unique=["run", "step"],
    strict=True,
)

EVALUATIONS = pa.DataFrameSchema(
    name="evaluations",
    columns={
        "eval_key": pa.Column(str, unique=True),
        "model": pa.Column(str),
        "method": pa.Column(str),
        "budget": pa.Column(float, nullable=True, coerce=True),
        "stage": pa.Column(str, pa.Check.isin(["reference", "before_finetune", "after_finetune", "exported"])),
        "metric": pa.Column(str, pa.Check.isin(["perplexity", "response_perplexity", "accuracy"])),
        "value": pa.Column(float, _finite_nonneg),
        "perplexity": pa.Column(float, nullable=True, coerce=True),
        "bits_per_param": pa.Column(float, nullable=True, coerce=True),
        "bits_incl_lowrank": pa.Column(float, nullable=True, coerce=True),
        "peak_mb": pa.Column(float, nullable=True, coerce=True),
        "n_tokens": pa.Column("Int64", nullable=True, coerce=True),
        "seq_len": pa.Column("Int64", nullable=True, coerce=True),
        "plan_id": pa.Column(str, nullable=True),
        "macro_f1": pa.Column(float, nullable=True, coerce=True),
        "dataset": pa.Column(str, nullable=True),
        "lr": pa.Column(float, pa.Check.gt(0), nullable=True, coerce=True),
        # exported rows only: the other stages' frames leave them out
        "runtime": pa.Column(str, pa.Check.isin(["llama.cpp", "transformers"]), nullable=True, required=False),
        "export_key": pa.Column(str, nullable=True, required=False),
    },
    strict=True,
)

EXPORTS = pa.DataFrameSchema(
    name="exports",
    columns={
        "export_key": pa.Column(str, unique=True),
        "model": pa.Column(str),
        "method": pa.Column(str),
        "budget": pa.Column(float, nullable=True, coerce=True),
        "plan_id": pa.Column(str),
        "run_key": pa.Column(str),
        "format": pa.Column(str, pa.Check.isin(["gguf", "hf", "peft"])),
        "path": pa.Column(str),
        "file_bytes": pa.Column("int64", pa.Check.gt(0)),
        "sha256": pa.Column(str),
        "target_bits": pa.Column(float, pa.Check.gt(0), nullable=True, coerce=True),
        "objective": pa.Column(float, _finite_nonneg, nullable=True, coerce=True),
        "notes": pa.Column(str, nullable=True),
    },
    strict=True,
)

EXPORT_TENSORS = pa.DataFrameSchema(
    name="export_tensors",
    columns={
        "export_key": pa.Column(str),
        "tensor": pa.Column(str),
        "type": pa.Column(str),
        "numel": pa.Column("int64", pa.Check.gt(0)),
        "nbytes": pa.Column("int64", pa.Check.gt(0)),
        "is_target": pa.Column(bool),
        "error": pa.Column(float, _finite_nonneg, nullable=True, coerce=True),
    },
    unique=["export_key", "tensor"],
    strict=True,
)
