"""Asset `evaluation`: perplexity and storage per method, before and after finetuning."""

import math

import dagster as dg

from assets.stage_asset import Produced, stage_asset
from lqlora_dagster.data.selection import TaskData
from lqlora_dagster.pipeline.context import StageContext
from lqlora_dagster.pipeline.evaluating import EVAL_VERSION, evaluation_table, run_evaluation
from lqlora_dagster.pipeline.handles import DecomposedHandle, EvaluationHandle, FinetunedHandle, ModelHandle
from lqlora_dagster.pipeline.settings import EvalSettings
from resources import WarehouseResource


@stage_asset("evaluation", EVAL_VERSION, {"duckdb"}, settings=EvalSettings)
def evaluation(
    ctx: StageContext,
    settings: EvalSettings,
    base_model: ModelHandle,
    task_data: TaskData,
    decomposed_model: DecomposedHandle,
    finetuned_adapters: FinetunedHandle,
) -> Produced:
    """Held-out perplexity and bits/param of the reference and every method (DuckDB `evaluations`)."""
    handle = run_evaluation(ctx, base_model, decomposed_model, finetuned_adapters, task_data, settings)
    table = evaluation_table(ctx, handle.eval_keys)
    return Produced(
        handle,
        "-".join(handle.eval_keys),
        [
            f"{r.method}{'' if r.budget != r.budget or r.budget is None else f' @ {r.budget:g}'}"
            f"{'' if r.stage == 'reference' else ' ' + r.stage.split('_')[0]} {r.metric} {r.value:.4g}"
            for r in table.itertuples()
        ],
        {"rows": len(table), "table": dg.MetadataValue.md(table.to_markdown(index=False, floatfmt=".4g"))},
        summary_limit=4,
    )


@dg.asset_check(
    asset=evaluation, description="Every perplexity is finite and positive; every accuracy lies in [0, 1]."
)
def perplexities_finite(evaluation: EvaluationHandle, warehouse: WarehouseResource) -> dg.AssetCheckResult:
    rows = warehouse.warehouse().query(
        "SELECT metric, value FROM evaluations WHERE eval_key IN (SELECT unnest(?::VARCHAR[]))",
        [evaluation.eval_keys],
    )
    ppl = lambda v: math.isfinite(v) and v > 0  # noqa: E731
    sane = {"perplexity": ppl, "response_perplexity": ppl, "accuracy": lambda v: 0 <= v <= 1}
    ok = len(rows) == len(evaluation.eval_keys) and all(
        sane[m](v) for m, v in zip(rows["metric"], rows["value"])
    )
    return dg.AssetCheckResult(passed=ok, metadata={"rows": len(rows)})
