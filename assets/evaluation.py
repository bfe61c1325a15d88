"""Asset `evaluation`: perplexity and storage per method, before and after finetuning."""

import math

import dagster as dg

from assets.config import config_class
from assets.shared import BASE_MODELS, stage_context, summary
from lqlora_dagster.data.selection import TaskData
from lqlora_dagster.pipeline.evaluating import EVAL_VERSION, evaluation_table, run_evaluation
from lqlora_dagster.pipeline.handles import DecomposedHandle, EvaluationHandle, FinetunedHandle, ModelHandle
from lqlora_dagster.pipeline.settings import EvalSettings
from lqlora_dagster.pipeline.stage_runs import measured_stage
from resources import ArtifactStoreResource, ComputeDevice, ModelSource, WarehouseResource

EvalConfig = config_class(EvalSettings)


@dg.asset(
    partitions_def=BASE_MODELS,
    group_name="evaluation",
    code_version=EVAL_VERSION,
    description="Held-out perplexity and bits/param of the reference and every method (DuckDB `evaluations`).",
    kinds={"duckdb"},
)
def evaluation(
    context: dg.AssetExecutionContext,
    config: EvalConfig,
    base_model: ModelHandle,
    task_data: TaskData,
    decomposed_model: DecomposedHandle,
    finetuned_adapters: FinetunedHandle,
    warehouse: WarehouseResource,
    artifacts: ArtifactStoreResource,
    models: ModelSource,
    compute: ComputeDevice,
) -> dg.Output[EvaluationHandle]:
    ctx = stage_context(context, warehouse, artifacts, models, compute)
    with measured_stage(ctx, "evaluation", base_model.model):
        handle = run_evaluation(ctx, base_model, decomposed_model, finetuned_adapters, task_data, config.settings())
    table = evaluation_table(ctx, handle.eval_keys)
    return dg.Output(
        handle,
        data_version=dg.DataVersion("-".join(handle.eval_keys)),
        metadata={
            "rows": len(table),
            "table": dg.MetadataValue.md(table.to_markdown(index=False, floatfmt=".4g")),
            "summary": summary(
                [
                    f"{r.method}{'' if r.budget != r.budget or r.budget is None else f' @ {r.budget:g}'}"
                    f"{'' if r.stage == 'reference' else ' ' + r.stage.split('_')[0]} {r.metric} {r.value:.4g}"
                    for r in table.itertuples()
                ],
                limit=4,
            ),
        },
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
    ok = len(rows) == len(evaluation.eval_keys) and all(sane[m](v) for m, v in zip(rows["metric"], rows["value"]))
    return dg.AssetCheckResult(passed=ok, metadata={"rows": len(rows)})
