"""Save and load named quantized matrices as one safetensors file (never pickle).

Tensors are keyed "<name>.<field>"; shapes and configs go in the header metadata.
Extra float tensors (e.g. low-rank factors) can ride along under their own keys.
"""

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.quant.matrix import QuantizedMatrix

_INDEX_KEY = "lqlora.matrices"


def save_matrices(
    path: Path,
    matrices: dict[str, QuantizedMatrix],
    extra: dict[str, torch.Tensor] | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = dict(metadata or {})
    for name, qm in matrices.items():
        if "," in name:
            raise LQLoRAInputError(f"matrix name {name!r} may not contain ','")
        t, m = qm.to("cpu").state(name)
        tensors.update(t)
        meta.update(m)
    for key, value in (extra or {}).items():
        if key in tensors:
            raise LQLoRAInputError(f"extra tensor {key!r} collides with a quantized matrix field")
        tensors[key] = value.detach().to("cpu").contiguous()
    meta[_INDEX_KEY] = ",".join(matrices)
    save_file(tensors, str(path), metadata=meta)


def load_matrices(path: Path) -> tuple[dict[str, QuantizedMatrix], dict[str, torch.Tensor], dict[str, str]]:
    """(matrices, extra tensors, metadata) from a file written by `save_matrices`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise LQLoRAInputError(f"cannot read quantized matrices from {path}: {err}") from err
    if _INDEX_KEY not in meta:
        raise LQLoRAInputError(f"{path} was not written by save_matrices (no {_INDEX_KEY!r} in its header)")
    names = [n for n in meta[_INDEX_KEY].split(",") if n]
    matrices = {n: QuantizedMatrix.from_state(tensors, meta, n) for n in names}
    used = {
        f"{n}.{field}" for n in names for field in ("codes", "scale_codes", "group_scales", "scale_offset")
    }
    extra = {k: v for k, v in tensors.items() if k not in used}
    return matrices, extra, meta
