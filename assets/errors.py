"""Asset `error_table`: e[i, c] and s[i, c] for every target matrix and candidate config.

A graph-backed asset so the work fans out: `error_table_chunk_<i>` computes the i-th
of N_CHUNKS groups of whole layers (in parallel under the multiprocess executor, or on
a cluster under dagster-dask), committing rows to DuckDB as each matrix
finishes; `error_table_summary` fans in and returns the handle.
"""

from typing import Literal

import dagster as dg
from pydantic import Field

from assets.shared import BASE_MODELS, stage_context
from lqlora_dagster.per_matrix_threads import matrix_workers
from lqlora_dagster.pipeline.error_table import TABLE_VERSION, compute_table_rows, table_chunks, table_handle
from lqlora_dagster.pipeline.handles import ErrorTableHandle, FisherHandle, ModelHandle
from lqlora_dagster.pipeline.settings import ErrorTableSettings
from resources import WarehouseResource


class ErrorTableConfig(dg.Config):
    """`grid` and `svd` are checked by Dagster before a run starts; `methods` (a list,
    which Dagster cannot enumerate) by the settings when the step starts."""

    methods: list[str] = Field(
        default=["lqlora-fisher"],
        description="qlora, loftq, qlora-ilp, lqlora-uniform, lqlora, lqlora-fisher (one table per init)",
    )
    rank: int = Field(
        default=16, description="rank of L1 L2 (16 suits 576-wide matrices; the paper used 64 at 7B)"
    )
    grid: Literal["full", "reduced"] = Field(default="full", description='"full" (the paper\'s 432 configs) or "reduced" (24)')
    svd: Literal["randomized", "full"] = Field(default="randomized", description='"randomized" or "full"')
    max_iters: int = 100
    rel_tol: float = 1e-3
    fast: bool = Field(
        default=True, description="shared-decomposition fast path; false: one decomposition per config"
    )
    refine_steps: int = Field(
        default=2,
        description="fast path: alternating steps for configs with coarse block-scale codes, one run "
        "per (b, B0, b0, B1) (0: price them on the shared decomposition: a table about 25% "
        "faster, unconfirmed plans up to ~3% worse)",
    )
    refine_max_b0: int = Field(
        default=3,
        description="fast path: block-scale codes of at most this many bits count as coarse (4: "
        "better unconfirmed plans, a table about 15% slower)",
    )
    threads_per_chunk: int = Field(
        default=1,
        description="matrices a chunk step computes at a time, on one torch thread each "
        "(parallelism is across steps; 0: one per core)",
    )

    def settings(self) -> ErrorTableSettings:
        return ErrorTableSettings(
            tuple(self.methods),
            self.rank,
            self.grid,
            self.svd,
            self.max_iters,
            self.rel_tol,
            self.fast,
            self.refine_steps,
            self.refine_max_b0,
        )


RESOURCES = {"warehouse", "artifacts", "models", "compute"}
# Static fan-out: a fixed number of chunk steps (a step with no layers left does nothing).
# Dynamic outputs would size this to the model, but dagster-dask plans its steps up
# front and silently skips dynamically mapped ones; static steps run on every executor.
N_CHUNKS = 8


def _ctx(context: dg.OpExecutionContext):
    r = context.resources
    return stage_context(context, r.warehouse, r.artifacts, r.models, r.compute)


def _chunk_op(index: int) -> dg.OpDefinition:
    @dg.op(name=f"error_table_chunk_{index}", required_resource_keys=RESOURCES, code_version=TABLE_VERSION)
    def chunk(
        context: dg.OpExecutionContext,
        config: ErrorTableConfig,
        base_model: ModelHandle,
        fisher_diagonals: FisherHandle,
    ) -> dict:
        """Compute (or find cached) rows for one group of layers."""
        ctx = _ctx(context)
        groups = table_chunks(ctx, base_model, N_CHUNKS)
        names = groups[index] if index < len(groups) else []
        workers = matrix_workers(ctx.device, config.threads_per_chunk)
        written = (
            compute_table_rows(ctx, base_model, fisher_diagonals, config.settings(), names, workers)
            if names
            else 0
        )
        context.log.info(f"chunk {index}: {len(names)} matrices, {written} new rows")
        return {"written": written}

    return chunk


CHUNK_OPS = [_chunk_op(i) for i in range(N_CHUNKS)]


@dg.op(required_resource_keys=RESOURCES, code_version=TABLE_VERSION)
def error_table_summary(
    context: dg.OpExecutionContext,
    config: ErrorTableConfig,
    chunks: list[dict],
    base_model: ModelHandle,
    fisher_diagonals: FisherHandle,
) -> dg.Output[ErrorTableHandle]:
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
    ops = [op.name for op in CHUNK_OPS] + ["error_table_summary"]
    return {name: {"config": config.model_dump()} for name in ops}


@dg.graph_asset(
    partitions_def=BASE_MODELS,
    group_name="allocation",
    code_version=TABLE_VERSION,
    config=_map_config,
    description="Quantization error and storage of every target x config (DuckDB `quant_errors`, "
    f"pandera-checked), computed in {N_CHUNKS} parallel chunks of whole layers.",
    kinds={"duckdb"},
)
def error_table(base_model: ModelHandle, fisher_diagonals: FisherHandle):
    done = [chunk(base_model, fisher_diagonals) for chunk in CHUNK_OPS]
    return error_table_summary(done, base_model, fisher_diagonals)


@dg.asset_check(asset=error_table, description="Every row is present, finite and >= 0.")
def errors_complete_and_finite(
    error_table: ErrorTableHandle, warehouse: WarehouseResource
) -> dg.AssetCheckResult:
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
    return dg.AssetCheckResult(
        passed=bad == 0 and missing == 0, metadata={"bad_rows": bad, "missing_rows": missing}
    )


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
