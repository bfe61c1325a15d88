"""Asset `error_table`: e[i, c] and s[i, c] for every target matrix and candidate config.

A graph-backed asset so the work fans out: `error_table_chunk_<i>` computes the i-th
of N_CHUNKS groups of whole layers (in parallel under the multiprocess executor, or on
a cluster under dagster-dask), committing rows to DuckDB as each matrix
finishes; `error_table_summary` fans in and returns the handle.
"""

import dagster as dg

from assets.run_config import config_class
from assets.shared import BASE_MODELS, summary
from lqlora_dagster.per_matrix_threads import matrix_workers
from lqlora_dagster.pipeline.base_model_stage import recorded_targets
from lqlora_dagster.pipeline.error_table_refs import TABLE_VERSION, table_chunks
from lqlora_dagster.pipeline.error_table_stage import compute_table_rows, table_handle
from lqlora_dagster.pipeline.handles import ErrorTableHandle, FisherHandle, ModelHandle
from lqlora_dagster.pipeline.settings import ErrorTableSettings
from lqlora_dagster.pipeline.stage_runs import measured_stage
from resources import WarehouseResource

ErrorTableConfig = config_class(ErrorTableSettings)

RESOURCES = {"stage"}
# Static fan-out: a fixed number of chunk steps (a step with no layers left does nothing).
# Dynamic outputs would size this to the model, but dagster-dask plans its steps up
# front and silently skips dynamically mapped ones; static steps run on every executor.
N_CHUNKS = 8


def _ctx(context: dg.OpExecutionContext):
    return context.resources.stage.context(context)


def _chunk_op(index: int) -> dg.OpDefinition:
    @dg.op(name=f"error_table_chunk_{index}", required_resource_keys=RESOURCES, code_version=TABLE_VERSION)
    def chunk(
        context: dg.OpExecutionContext,
        config: ErrorTableConfig,
        base_model: ModelHandle,
        fisher_diagonals: FisherHandle,
    ) -> dict:
        """Compute (or find cached) rows for one group of layers."""
        ctx, settings = _ctx(context), config.settings()
        groups = table_chunks(recorded_targets(ctx, base_model.model), N_CHUNKS)
        names = groups[index] if index < len(groups) else []
        workers = matrix_workers(ctx.device, settings.threads_per_chunk)
        written = 0
        if names:
            with measured_stage(ctx, f"error_table_chunk_{index}", base_model.model):
                written = compute_table_rows(ctx, base_model, fisher_diagonals, settings, names, workers)
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
            "tables": dg.MetadataValue.json(
                {f"{t.method} rank {t.rank}": t.table_key for t in handle.tables}
            ),
            "ranks": dg.MetadataValue.json(sorted({t.rank for t in handle.tables})),
            "summary": summary(
                [
                    f"{sum(t.n_rows for t in handle.tables):,} rows for {len(handle.tables)} method(s), "
                    f"{sum(c['written'] for c in chunks):,} computed now"
                ]
            ),
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
