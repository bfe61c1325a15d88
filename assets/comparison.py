"""Asset `comparison_report`, and the run config of the comparison job: every method at
the paper's budgets on one model, rendered as a table and plots in the UI."""

import base64

import dagster as dg

from assets.shared import BASE_MODELS, stage_context, summary
from lqlora_dagster.comparison import LM_COMPARISON, Comparison
from lqlora_dagster.pipeline.handles import EvaluationHandle, PlanHandle, ReportHandle
from lqlora_dagster.pipeline.reporting import (
    HEATMAP,
    PARETO,
    REPORT_VERSION,
    TABLE,
    report_folder,
    run_report,
)
from resources import ArtifactStoreResource, ComputeDevice, ModelSource, WarehouseResource

COMPARISON_JOB = "comparison_job"


def comparison_run_config(comparison: Comparison = LM_COMPARISON) -> dict:
    """The comparison as a run config (the job's default; the launchpad shows it)."""
    return comparison.run_config()


def _inline_png(path) -> str:
    """A PNG as a markdown image the Dagster UI renders inside the metadata panel."""
    return f"![{path.stem}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"


@dg.asset(
    partitions_def=BASE_MODELS,
    group_name="evaluation",
    code_version=REPORT_VERSION,
    description="Every method's perplexity and bits/param as a table, a Pareto plot of perplexity vs "
    "total bits/param, and a heatmap of one ILP plan's bits per layer and matrix type.",
    kinds={"duckdb", "matplotlib"},
)
def comparison_report(
    context: dg.AssetExecutionContext,
    evaluation: EvaluationHandle,
    allocation_plan: PlanHandle,
    warehouse: WarehouseResource,
    artifacts: ArtifactStoreResource,
    models: ModelSource,
    compute: ComputeDevice,
) -> dg.Output[ReportHandle]:
    ctx = stage_context(context, warehouse, artifacts, models, compute)
    handle = run_report(ctx, evaluation, allocation_plan)
    folder = report_folder(ctx, handle)
    metadata = {
        "table": dg.MetadataValue.md((folder / TABLE).read_text()),
        "pareto": dg.MetadataValue.md(_inline_png(folder / PARETO)),
        "folder": dg.MetadataValue.path(str(folder)),
        "summary": summary([f"{', '.join(handle.files)} in {folder}"]),
    }
    if HEATMAP in handle.files:
        metadata["allocation"] = dg.MetadataValue.md(_inline_png(folder / HEATMAP))
    return dg.Output(handle, data_version=dg.DataVersion(handle.key), metadata=metadata)
