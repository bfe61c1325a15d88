"""Asset `decomposed_model`: packed Q + L1, L2 for every target, per plan."""

import dagster as dg
import torch

from assets.shared import BASE_MODELS, stage_context, summary
from lqlora_dagster.pipeline.decomposition import ASSET, DECOMPOSITION_VERSION, run_decomposition
from lqlora_dagster.pipeline.handles import DecomposedHandle, FisherHandle, ModelHandle, PlanHandle
from lqlora_dagster.pipeline.stage_runs import measured_stage
from lqlora_dagster.quant.bitpack import pack_bits, unpack_bits
from lqlora_dagster.surgery.injector import lq_layers
from lqlora_dagster.surgery.lq_model_io import load_lq_model
from resources import ArtifactStoreResource, ComputeDevice, ModelSource, WarehouseResource


@dg.asset(
    partitions_def=BASE_MODELS,
    group_name="compression",
    code_version=DECOMPOSITION_VERSION,
    description="The LQ model per plan: packed Q and L1, L2 (safetensors folder; DuckDB `decompositions`).",
    kinds={"pytorch", "safetensors"},
)
def decomposed_model(
    context: dg.AssetExecutionContext,
    base_model: ModelHandle,
    allocation_plan: PlanHandle,
    fisher_diagonals: FisherHandle,
    warehouse: WarehouseResource,
    artifacts: ArtifactStoreResource,
    models: ModelSource,
    compute: ComputeDevice,
) -> dg.Output[DecomposedHandle]:
    ctx = stage_context(context, warehouse, artifacts, models, compute)
    with measured_stage(ctx, "decomposed_model", base_model.model):
        handle = run_decomposition(ctx, base_model, allocation_plan, fisher_diagonals)
    paths = {
        f"{d.method}@{d.budget:g}": str(ctx.store.get(ASSET, handle.model, d.decomp_key, verify=False).path)
        for d in handle.items
    }
    return dg.Output(
        handle,
        data_version=dg.DataVersion("-".join(d.decomp_key for d in handle.items)),
        metadata={
            "paths": dg.MetadataValue.json(paths),
            "bits_per_param": dg.MetadataValue.json(
                {f"{d.method}@{d.budget:g}": round(d.bits_per_param, 4) for d in handle.items}
            ),
            "bits_incl_lowrank": dg.MetadataValue.json(
                {f"{d.method}@{d.budget:g}": round(d.bits_incl_lowrank, 4) for d in handle.items}
            ),
            "summary": summary(
                [
                    f"{d.method} @ {d.budget:g}: {d.bits_per_param:.3f} bits/param "
                    f"({d.bits_incl_lowrank:.3f} with the low-rank part)"
                    for d in handle.items
                ]
            ),
        },
    )


@dg.asset_check(
    asset=decomposed_model,
    description="Stored files match their checksums and every packed Q round-trips exactly (unpack/repack, byte count).",
)
def dequantization_round_trip(
    decomposed_model: DecomposedHandle, artifacts: ArtifactStoreResource, warehouse: WarehouseResource
) -> dg.AssetCheckResult:
    store = artifacts.store(warehouse.warehouse())
    layers_checked, failures = 0, []
    for d in decomposed_model.items:
        art = store.get(ASSET, decomposed_model.model, d.decomp_key)  # verifies checksums
        for name, layer in lq_layers(load_lq_model(art.path)).items():
            q = layer.quantized()
            codes = q.codes()
            repacked = pack_bits(codes.codes, q.config.b)
            exact = torch.equal(repacked, q.packed_codes) and q.nbytes == q.expected_nbytes()
            exact = exact and torch.equal(unpack_bits(repacked, q.config.b, codes.codes.numel()), codes.codes)
            layers_checked += 1
            if not exact:
                failures.append(f"{d.method}@{d.budget:g} {name}")
    return dg.AssetCheckResult(
        passed=not failures,
        metadata={"layers": layers_checked, "failures": dg.MetadataValue.json(failures[:10])},
    )
