"""A GGUF file whose every target tensor has the llama.cpp type an ILP chose.

The file llama.cpp's converter wrote (all float32) is re-written tensor by tensor: each
target in the type the plan picked, quantized by llama.cpp's own code with the Fisher
information of its input columns as the importance vector (what `llama-imatrix`
measures from activations, here from the gradients the Fisher stage collected);
other matrices (embeddings, an untied output) in one chosen type; vectors (norms,
biases) stay float32 as llama.cpp expects.

The choice is the LQ-LoRA allocation again, over llama.cpp's types instead of
NormalFloat configs: a table of (tensor, type) -> Fisher-weighted squared error of
what the type stores, and the ILP that minimises the total under a bits-per-weight
(or file-size) budget.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from gguf import GGUFReader, GGUFValueType, GGUFWriter, Keys

from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.export import ggml_quant
from lqlora_dagster.export.ggml_types import PLAIN, GGMLType, fitting, ggml_type

F32 = ggml_type("F32")
ALIGN_SLACK = 32  # bytes of alignment padding a tensor may add in the file


@dataclass(frozen=True)
class Written:
    """One tensor as the file holds it."""

    name: str
    type: str
    numel: int
    nbytes: int
    target: bool


def matrices(reader: GGUFReader) -> dict[str, np.ndarray]:
    """The 2-D float32 tensors of a converted file, as (rows, row_length) views."""
    return {t.name: np.asarray(t.data) for t in reader.tensors if len(t.data.shape) == 2}


def marked_targets(fisher: GGUFReader) -> list[str]:
    """The targets of a Fisher file (converted from weights that are the Fisher diagonal
    on targets and zero elsewhere): the matrices with any non-zero entry."""
    return [name for name, f in matrices(fisher).items() if np.any(f)]


def column_importance(fisher: np.ndarray) -> np.ndarray:
    """Per input column, the Fisher mass of its weights: the importance vector llama.cpp's
    quantizers weigh their scale search with (llama-imatrix's role)."""
    col = fisher.sum(axis=0, dtype=np.float64)
    return (col / max(col.mean(), 1e-30)).astype(np.float32)


def type_table(
    weights: GGUFReader,
    fisher: GGUFReader,
    allowed: tuple[GGMLType, ...],
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> pd.DataFrame:
    """(tensor, type) -> storage and Fisher-weighted squared error of what the type stores,
    for every target and every allowed type its rows fit."""
    w_all, f_all = matrices(weights), matrices(fisher)
    names = marked_targets(fisher)
    if not names:
        raise LQLoRAInputError("the converted file has no target matrices to quantize")
    rows = []
    for i, name in enumerate(names):
        w, f = w_all[name], f_all[name].astype(np.float32)
        kinds = fitting(w.shape[1], allowed)
        if not kinds:
            raise LQLoRAInputError(
                f"no allowed llama.cpp type fits {name} (rows of {w.shape[1]}); allow one whose block divides it "
                f"({', '.join(t.name + f'/{t.block}' for t in allowed)})"
            )
        importance = column_importance(f)
        for kind in kinds:
            data = ggml_quant.quantize(w, kind, importance)
            stored = ggml_quant.dequantize(data, kind, w.shape)
            err = float(np.sum(f * np.square(w - stored), dtype=np.float64))
            rows.append({"matrix": name, "config": kind.name, "rank": 0, "numel": w.size, "error": err,
                         "storage_bits": 8 * data.size})
        progress(i + 1, len(names))
    table = pd.DataFrame(rows)
    table["bits_per_param"] = table["storage_bits"] / table["numel"]
    return table


def non_target_bytes(weights: GGUFReader, targets: set[str], other: GGMLType) -> int:
    """What the file spends outside the targets: other matrices in `other`, vectors in
    float32, and the header (metadata, the vocabulary) with alignment."""
    total = 0
    for t in weights.tensors:
        if t.name in targets:
            continue
        shape = np.asarray(t.data).shape
        kind = _other_kind(shape, other)
        total += kind.nbytes(shape[0], shape[1]) if len(shape) == 2 else 4 * int(np.prod(shape))
    header = int(weights.tensors[0].data_offset) if weights.tensors else 0
    return total + header + ALIGN_SLACK * len(weights.tensors)


def _other_kind(shape: tuple[int, ...], other: GGMLType) -> GGMLType:
    if len(shape) != 2:
        return F32
    if other in PLAIN or other.fits(shape[1]):
        return other
    return ggml_type("F16")


def _encode(array: np.ndarray, kind: GGMLType, importance: np.ndarray | None) -> np.ndarray:
    if kind.name == "F32":
        return np.ascontiguousarray(array, dtype=np.float32)
    if kind.name == "F16":
        return np.ascontiguousarray(array, dtype=np.float16)
    data = ggml_quant.quantize(array, kind, importance)
    return data.reshape(array.shape[0], -1)


def write_mixed(
    weights: GGUFReader,
    fisher: GGUFReader,
    out: Path,
    picks: dict[str, GGMLType],
    other: GGMLType,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> list[Written]:
    """Write `out`: the converted file's metadata, each target in its picked type, the
    rest as the module docstring says. Returns what was written, tensor by tensor."""
    f_all = matrices(fisher)
    arch = str(weights.fields[Keys.General.ARCHITECTURE].contents())
    writer = GGUFWriter(str(out), arch=arch, endianess=weights.endianess)
    for field in weights.fields.values():
        if field.name == Keys.General.ARCHITECTURE or field.name.startswith("GGUF.") or field.name == Keys.General.FILE_TYPE:
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    plan = []
    for t in weights.tensors:
        array = np.asarray(t.data)
        target = t.name in picks
        kind = picks[t.name] if target else _other_kind(array.shape, other)
        nbytes = kind.nbytes(array.shape[0], array.shape[1]) if len(array.shape) == 2 else 4 * array.size
        plan.append((t, kind, target, nbytes))
        if kind.name in ("F32", "F16"):
            dtype = np.float32 if kind.name == "F32" else np.float16
            writer.add_tensor_info(t.name, array.shape, np.dtype(dtype), nbytes)
        else:
            byte_shape = (array.shape[0], nbytes // array.shape[0])
            writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=kind.ggml)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    written = []
    for i, (t, kind, target, nbytes) in enumerate(plan):
        array = np.asarray(t.data)
        importance = column_importance(f_all[t.name].astype(np.float32)) if target else None
        data = _encode(array, kind, importance)
        if data.nbytes != nbytes:
            raise RuntimeError(f"{t.name}: {data.nbytes} bytes encoded, {nbytes} planned")
        writer.write_tensor_data(data)
        written.append(Written(t.name, kind.name, int(array.size), int(nbytes), target))
        progress(i + 1, len(plan))
    writer.close()
    return written
