"""Asset `decomposed_model`: packed Q + L1, L2 for every target, per plan."""

import dagster as dg
import torch

from assets.stage_asset import Produced, stage_asset
from lqlora_dagster.pipeline.context import StageContext
from lqlora_dagster.pipeline.decomposition import ASSET, DECOMPOSITION_VERSION, run_decomposition
from lqlora_dagster.pipeline.handles import DecomposedHandle, FisherHandle, ModelHandle, PlanHandle
from lqlora_dagster.quant.bitpack import pack_bits, unpack_bits
from lqlora_dagster.surgery.injector import lq_layers
from lqlora_dagster.surgery.lq_model_io import load_lq_model
from resources import ArtifactStoreResource, WarehouseResource


@stage_asset("compression", DECOMPOSITION_VERSION, {"pytorch", "safetensors"})
def decomposed_model(
    ctx: StageContext, base_model: ModelHandle, allocation_plan: PlanHandle, fisher_diagonals: FisherHandle
) -> Produced:
    """The LQ model per plan: packed Q and L1, L2 (safetensors folder; DuckDB `decompositions`)."""
    handle = run_decomposition(ctx, base_model, allocation_plan, fisher_diagonals)
    names = [f"{d.method}@{d.budget:g}" for d in handle.items]
    paths = [str(ctx.store.get(ASSET, handle.model, d.decomp_key, verify=False).path) for d in handle.items]
    return Produced(
        handle,
        "-".join(d.decomp_key for d in handle.items),
        [
            f"{d.method} @ {d.budget:g}: {d.bits_per_param:.3f} bits/param ({d.bits_incl_lowrank:.3f} with the low-rank "
            "part)"
            for d in handle.items
        ],
        {
            "paths": dg.MetadataValue.json(dict(zip(names, paths))),
            "bits_per_param": dg.MetadataValue.json(
                {n: round(d.bits_per_param, 4) for n, d in zip(names, handle.items)}
            ),
            "bits_incl_lowrank": dg.MetadataValue.json(
                {n: round(d.bits_incl_lowrank, 4) for n, d in zip(names, handle.items)}
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
