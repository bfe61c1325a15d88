"""Asset `comparison_report`, and the run config of the comparison job: every method at
the paper's budgets on one model, rendered as a table and plots in the UI."""

import base64

import dagster as dg

from assets.stage_asset import Produced, stage_asset
from lqlora_dagster.comparison import LM_COMPARISON, Comparison
from lqlora_dagster.pipeline.context import StageContext
from lqlora_dagster.pipeline.handles import EvaluationHandle, PlanHandle
from lqlora_dagster.pipeline.reporting import (
    HEATMAP,
    PARETO,
    REPORT_VERSION,
    TABLE,
    report_folder,
    run_report,
)

COMPARISON_JOB = "comparison_job"


def comparison_run_config(comparison: Comparison = LM_COMPARISON) -> dict:
    """The comparison as a run config (the job's default; the launchpad shows it)."""
    return comparison.run_config()


def _inline_png(path) -> str:
    """A PNG as a markdown image the Dagster UI renders inside the metadata panel."""
    return f"![{path.stem}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"


@stage_asset("evaluation", REPORT_VERSION, {"duckdb", "matplotlib"}, measured=False)
def comparison_report(
    ctx: StageContext, evaluation: EvaluationHandle, allocation_plan: PlanHandle
) -> Produced:
    """Every method's perplexity and bits/param as a table, a Pareto plot of perplexity vs total bits/param, and a heatmap of one ILP plan's bits per layer and matrix type."""
    handle = run_report(ctx, evaluation, allocation_plan)
    folder = report_folder(ctx, handle)
    metadata = {
        "table": dg.MetadataValue.md((folder / TABLE).read_text()),
        "pareto": dg.MetadataValue.md(_inline_png(folder / PARETO)),
        "folder": dg.MetadataValue.path(str(folder)),
    }
    if HEATMAP in handle.files:
        metadata["allocation"] = dg.MetadataValue.md(_inline_png(folder / HEATMAP))
    return Produced(handle, handle.key, [f"{', '.join(handle.files)} in {folder}"], metadata)
