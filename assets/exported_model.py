"""Asset `exported_model`: the finetuned model as a GGUF for llama.cpp, merged weights
for transformers, or a PEFT adapter, checked in its runtime. Its own job (`export_job`),
run by `lqlora export` after the main job."""

import base64

import dagster as dg

from assets.stage_asset import Produced, stage_asset
from lqlora_dagster.data.selection import TaskData
from lqlora_dagster.export.type_map import type_map_png
from lqlora_dagster.pipeline.context import StageContext
from lqlora_dagster.pipeline.exporting import EXPORT_VERSION, run_export
from lqlora_dagster.pipeline.handles import ExportHandle, FinetunedHandle, FisherHandle, ModelHandle
from lqlora_dagster.pipeline.settings import ExportSettings
from resources import WarehouseResource

EXPORT_JOB = "export_job"


@stage_asset("export", EXPORT_VERSION, {"gguf", "safetensors", "duckdb"}, settings=ExportSettings)
def exported_model(
    ctx: StageContext,
    settings: ExportSettings,
    base_model: ModelHandle,
    task_data: TaskData,
    fisher_diagonals: FisherHandle,
    finetuned_adapters: FinetunedHandle,
) -> Produced:
    """The finetuned model written for another runtime (DuckDB `exports`; a GGUF's tensor types in `export_tensors`), with its perplexity there beside the in-tool model's (`evaluations`, stage `exported`)."""
    handle = run_export(ctx, base_model, fisher_diagonals, finetuned_adapters, task_data, settings)
    what = f"{handle.method}{'' if handle.budget is None else f' @ {handle.budget:g}'}"
    line = f"{what} as {handle.format}: {handle.file_bytes / 1e6:.1f} MB at {handle.path}"
    metadata = {"path": dg.MetadataValue.path(handle.path), "file_mb": round(handle.file_bytes / 1e6, 2)}
    if handle.exported_ppl is not None:
        line += f"; perplexity {handle.exported_ppl:.3f} (in lqlora {handle.in_tool_ppl:.3f})"
        metadata.update(exported_perplexity=handle.exported_ppl, in_tool_perplexity=handle.in_tool_ppl)
    if handle.format == "gguf":
        tensors = ctx.warehouse.query("SELECT * FROM export_tensors WHERE export_key = ?", [handle.export_key])
        bits = ctx.warehouse.query("SELECT target_bits FROM exports WHERE export_key = ?", [handle.export_key])
        metadata["bits_per_target_weight"] = float(bits["target_bits"][0])
        counts = tensors[tensors["is_target"]]["type"].value_counts()
        metadata["target_types"] = dg.MetadataValue.json({k: int(v) for k, v in counts.items()})
        png = type_map_png(tensors, f"{what}: llama.cpp type per target matrix")
        metadata["types_per_layer"] = dg.MetadataValue.md(
            f"![types](data:image/png;base64,{base64.b64encode(png).decode()})"
        )
    return Produced(handle, handle.export_key, [line], metadata)


@dg.asset_check(
    asset=exported_model,
    description="The exported file scores within its margin of the in-tool model on the same windows.",
)
def export_close_to_in_tool(exported_model: ExportHandle, warehouse: WarehouseResource) -> dg.AssetCheckResult:
    if exported_model.exported_ppl is None:
        return dg.AssetCheckResult(passed=True, metadata={"checked": False})
    recorded = warehouse.warehouse().query("SELECT 1 FROM exports WHERE export_key = ?", [exported_model.export_key])
    rise = exported_model.exported_ppl / exported_model.in_tool_ppl - 1
    return dg.AssetCheckResult(
        passed=not recorded.empty and rise <= exported_model.margin,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"rise": round(rise, 4), "margin": exported_model.margin, "exported": exported_model.exported_ppl,
                  "in_tool": exported_model.in_tool_ppl},
    )
