"""`stage_asset`: one declaration turns a pipeline stage into a partitioned asset.

A stage is written as `fn(ctx, [partition,] [settings,] **upstream) -> Produced`: it
gets the `StageContext`, the partition (the base model) if it asks for it, its settings
(checked, from the launchpad's config of the class `settings=` names), and its inputs
(named after the upstream assets, annotated with their handle types), and returns its
handle with a data version, summary lines and metadata. Its docstring describes the
asset in the UI. The decorator adds what every asset repeats: the `stage` resource that builds the
context, the stage's time and peak memory in DuckDB `stage_runs`, the `dg.Output` with
its data version, and a one-line `summary` for the CLI.
"""

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from assets.run_config import config_class
from assets.shared import BASE_MODELS, summary
from lqlora_dagster.pipeline.stage_runs import measured_stage
from resources.stage import StageResources


@dataclass(frozen=True)
class Produced:
    """What a stage hands its asset: the handle downstream stages receive, its data
    version (the content key: equal keys mean equal results), lines for the summary,
    and metadata for the UI."""

    handle: Any
    version: str
    lines: list[str]
    metadata: dict = field(default_factory=dict)
    summary_limit: int = 3


def stage_asset(group: str, version: str, kinds: set[str], *, settings: type | None = None, measured: bool = True):
    """Declare `fn` as the asset of the same name, partitioned by base model, described by
    its docstring; `settings` (a settings dataclass) becomes its launchpad config."""

    def declare(fn):
        params = list(inspect.signature(fn).parameters.values())[1:]  # the stage's own, after ctx
        wants_partition = bool(params) and params[0].name == "partition"
        params = params[1:] if wants_partition else params
        if settings is not None:  # the launchpad's config stands where the stage takes its settings
            config = config_class(settings)
            params = [
                inspect.Parameter("config", p.kind, annotation=config) if p.name == "settings" else p
                for p in params
            ]
        context = inspect.Parameter(
            "context", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=dg.AssetExecutionContext
        )
        stage = inspect.Parameter("stage", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=StageResources)

        @functools.wraps(fn)
        def compute(context: dg.AssetExecutionContext, stage: StageResources, **inputs) -> dg.Output:
            ctx = stage.context(context)
            if wants_partition:
                inputs["partition"] = context.partition_key
            if settings is not None:
                inputs["settings"] = inputs.pop("config").settings()
            if measured:
                with measured_stage(ctx, fn.__name__, context.partition_key):
                    out = fn(ctx, **inputs)
            else:
                out = fn(ctx, **inputs)
            return dg.Output(
                out.handle,
                data_version=dg.DataVersion(out.version),
                metadata={**out.metadata, "summary": summary(out.lines, limit=out.summary_limit)},
            )

        compute.__signature__ = inspect.Signature([context, *params, stage], return_annotation=dg.Output)
        return dg.asset(
            name=fn.__name__,
            partitions_def=BASE_MODELS,
            group_name=group,
            code_version=version,
            description=inspect.cleandoc(fn.__doc__ or ""),
            kinds=kinds,
        )(compute)

    return declare
