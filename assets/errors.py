"""Asset `error_table`: e[i, c] and s[i, c] for every target matrix and candidate config."""

import dagster as dg
from pydantic import Field

from assets.shared import BASE_MODELS, stage_context
from lqlora_dagster.pipeline.error_table import TABLE_VERSION, run_error_table
from lqlora_dagster.pipeline.handles import ErrorTableHandle, FisherHandle, ModelHandle
from lqlora_dagster.pipeline.settings import ErrorTableSettings
from resources import ArtifactStoreResource, ComputeDevice, ModelSource, WarehouseResource


class ErrorTableConfig(dg.Config):
    methods: list[str] = Field(
        default=["lqlora-fisher"],
        description="qlora, loftq, qlora-ilp, lqlora-uniform, lqlora, lqlora-fisher (one table per init)",
    )
    rank: int = Field(
        default=16, description="rank of L1 L2 (16 suits 576-wide matrices; the paper used 64 at 7B)"
    )
    grid: str = Field(default="reduced", description='"reduced" (24 configs) or "full" (the paper\'s 432)')
    svd: str = Field(default="randomized", description='"randomized" or "full"')
    max_iters: int = 100
    rel_tol: float = 1e-3
    fast: bool = Field(
        default=True, description="shared-decomposition fast path; false: one decomposition per config"
    )

    def settings(self) -> ErrorTableSettings:
        return ErrorTableSettings(
            tuple(self.methods), self.rank, self.grid, self.svd, self.max_iters, self.rel_tol, self.fast
        )


@dg.asset(
    partitions_def=BASE_MODELS,
    group_name="allocation",
    code_version=TABLE_VERSION,
    description="Quantization error and storage of every target x config (DuckDB `quant_errors`, pandera-checked).",
    kinds={"duckdb"},
)
def error_table(
    context: dg.AssetExecutionContext,
    config: ErrorTableConfig,
    base_model: ModelHandle,
    fisher_diagonals: FisherHandle,
    warehouse: WarehouseResource,
    artifacts: ArtifactStoreResource,
    models: ModelSource,
    compute: ComputeDevice,
) -> dg.Output[ErrorTableHandle]:
    ctx = stage_context(context, warehouse, artifacts, models, compute)
    handle = run_error_table(ctx, base_model, fisher_diagonals, config.settings())
    return dg.Output(
        handle,
        data_version=dg.DataVersion("-".join(t.table_key for t in handle.tables)),
        metadata={
            "rows": sum(t.n_rows for t in handle.tables),
            "tables": dg.MetadataValue.json({t.method: t.table_key for t in handle.tables}),
            "rank": handle.rank,
        },
    )


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
