"""Asset `error_table`: e[i, c] and s[i, c] for every target matrix and candidate config.

A graph-backed asset so the work fans out: `error_table_chunks` splits the targets
into groups of layers, `error_table_chunk` runs once per group (in parallel under the
multiprocess executor, or on a cluster under dagster-dask/-celery/-k8s), committing
rows to DuckDB as each matrix finishes; `error_table_summary` returns the handle.
"""

import os

import dagster as dg
import torch
from pydantic import Field

from assets.shared import BASE_MODELS, stage_context
from lqlora_dagster.pipeline.error_table import TABLE_VERSION, compute_table_rows, table_chunks, table_handle
from lqlora_dagster.pipeline.handles import ErrorTableHandle, FisherHandle, ModelHandle
from lqlora_dagster.pipeline.settings import ErrorTableSettings
from resources import ArtifactStoreResource, ComputeDevice, ModelSource, WarehouseResource


class ErrorTableConfig(dg.Config):
    methods: list[str] = Field(
        default=["lqlora-fisher"],
        description="qlora, loftq, qlora-ilp, lqlora-uniform, lqlora, lqlora-fisher (one table per init)",
    )
    rank: int = Field(default=16, description="rank of L1 L2 (16 suits 576-wide matrices; the paper used 64 at 7B)")
    grid: str = Field(default="full", description='"full" (the paper\'s 432 configs) or "reduced" (24)')
    svd: str = Field(default="randomized", description='"randomized" or "full"')
    max_iters: int = 100
    rel_tol: float = 1e-3
    fast: bool = Field(default=True, description="shared-decomposition fast path; false: one decomposition per config")
    chunks: int = Field(default=8, description="groups of layers computed as separate steps (parallel)")
    threads_per_chunk: int = Field(default=1, description="torch CPU threads per chunk step (parallelism is across steps)")

    def settings(self) -> ErrorTableSettings:
        return ErrorTableSettings(
            tuple(self.methods), self.rank, self.grid, self.svd, self.max_iters, self.rel_tol, self.fast
        )


RESOURCES = {"warehouse", "artifacts", "models", "compute"}


def _ctx(context: dg.OpExecutionContext):
    r = context.resources
    return stage_context(context, r.warehouse, r.artifacts, r.models, r.compute)


@dg.op(out=dg.DynamicOut(dict), required_resource_keys=RESOURCES, code_version=TABLE_VERSION)
def error_table_chunks(context: dg.OpExecutionContext, config: ErrorTableConfig, base_model: ModelHandle):
    """Split the targets into groups of layers, one mapped step each."""
    for i, names in enumerate(table_chunks(_ctx(context), base_model, config.chunks)):
        yield dg.DynamicOutput({"matrices": names, "config": config.model_dump()}, mapping_key=f"chunk_{i}")


@dg.op(required_resource_keys=RESOURCES, code_version=TABLE_VERSION)
def error_table_chunk(
    context: dg.OpExecutionContext, chunk: dict, base_model: ModelHandle, fisher_diagonals: FisherHandle
) -> dict:
    """Compute (or find cached) rows for one group of layers."""
    config = ErrorTableConfig(**chunk["config"])
    if config.threads_per_chunk > 0:
        torch.set_num_threads(min(config.threads_per_chunk, os.cpu_count() or 1))
    written = compute_table_rows(_ctx(context), base_model, fisher_diagonals, config.settings(), chunk["matrices"])
    context.log.info(f"{len(chunk['matrices'])} matrices, {written} new rows")
    return {"config": chunk["config"], "written": written}


@dg.op(required_resource_keys=RESOURCES, code_version=TABLE_VERSION)
def error_table_summary(
    context: dg.OpExecutionContext, chunks: list[dict], base_model: ModelHandle, fisher_diagonals: FisherHandle
) -> dg.Output[ErrorTableHandle]:
    config = ErrorTableConfig(**chunks[0]["config"])
    handle = table_handle(base_model, fisher_diagonals, config.settings())
    return dg.Output(
        handle,
        data_version=dg.DataVersion("-".join(t.table_key for t in handle.tables)),
        metadata={
            "rows": sum(t.n_rows for t in handle.tables),
            "new_rows": sum(c["written"] for c in chunks),
            "tables": dg.MetadataValue.json({t.method: t.table_key for t in handle.tables}),
            "rank": handle.rank,
        },
    )


@dg.config_mapping
def _map_config(config: ErrorTableConfig) -> dict:
    """The graph asset takes the same flat config as a plain asset would."""
    return {"error_table_chunks": {"config": config.model_dump()}}


@dg.graph_asset(
    partitions_def=BASE_MODELS,
    group_name="allocation",
    code_version=TABLE_VERSION,
    config=_map_config,
    description="Quantization error and storage of every target x config (DuckDB `quant_errors`, "
    "pandera-checked), computed in parallel chunks of layers.",
    kinds={"duckdb"},
)
def error_table(base_model: ModelHandle, fisher_diagonals: FisherHandle):
    chunks = error_table_chunks(base_model)
    done = chunks.map(lambda c: error_table_chunk(c, base_model, fisher_diagonals))
    return error_table_summary(done.collect(), base_model, fisher_diagonals)


@dg.asset_check(asset=error_table, description="Every row is present, finite and >= 0.")
def errors_complete_and_finite(error_table: ErrorTableHandle, warehouse: WarehouseResource) -> dg.AssetCheckResult:
    w = warehouse.warehouse()
    bad, missing = 0, 0
    for t in error_table.tables:
        rows = w.query(
            "SELECT count(*) FILTER (WHERE NOT isfinite(error) OR error < 0) AS bad, "
            "count(DISTINCT matrix || '|' || config) FILTER (WHERE list_contains(?, config)) AS n "
            "FROM quant_errors WHERE table_key = ?",
            [t.configs, t.table_key],
        )
        bad += int(rows["bad"].iloc[0])
        missing += t.n_rows - int(rows["n"].iloc[0])
    return dg.AssetCheckResult(passed=bad == 0 and missing == 0, metadata={"bad_rows": bad, "missing_rows": missing})


@dg.asset_check(
    asset=error_table,
    description="Error falls as bits rise, for fixed scale storage and block sizes (warns on violations: LQ is a heuristic).",
)
def error_falls_with_bits(error_table: ErrorTableHandle, warehouse: WarehouseResource) -> dg.AssetCheckResult:
    keys = [t.table_key for t in error_table.tables]
    rows = warehouse.warehouse().query(
        "SELECT count(*) AS pairs, count(*) FILTER (WHERE hi.error > lo.error * 1.001) AS violations "
        "FROM quant_errors lo JOIN quant_errors hi USING (table_key, matrix, b0, b1, block_size, group_size) "
        "WHERE lo.table_key IN (SELECT unnest(?::VARCHAR[])) AND hi.b > lo.b",
        [keys],
    )
    pairs, violations = int(rows["pairs"].iloc[0]), int(rows["violations"].iloc[0])
    return dg.AssetCheckResult(
        passed=violations == 0,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"pairs": pairs, "violations": violations},
    )
