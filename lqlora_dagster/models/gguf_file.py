"""What a GGUF file says it holds, read from its header alone, and its tensors
dequantized back one slice at a time.

A GGUF is a binary header (metadata, then each tensor's name, dims, GGML type and
offset) and aligned data. The header is parsed here with every read bounds-checked, so
a file cut short, a vocabulary-only GGUF or a tensor whose data lies past the end
becomes a `Problem` naming the file and the tensor, never a `struct.error` or a reshape
error from inside gguf's reader (which would also parse the large vocabulary again).
"""

import mmap
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from lqlora_dagster.models.checkpoint_files import (
    MAX_ELEMENTS,
    CheckpointProblems,
    Problem,
    TensorEntry,
    cut_short,
    refuse,
)

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 8
_DAMAGED = "the header is damaged; download the file again"
_CONVERT = "convert the model again with a current llama.cpp (convert_hf_to_gguf.py)"


class _HeaderEnds(Exception):
    """The header needs bytes the file does not have."""


class _GGUFHeader:
    """A cursor over a GGUF's header: every read is bounds-checked."""

    def __init__(self, buf, order: str):
        self.buf, self.order, self.pos = buf, order, 0

    def take(self, fmt: str):
        fmt = self.order + fmt
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise _HeaderEnds
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise _HeaderEnds
        self.pos += n

    def string(self) -> str:
        n = self.take("Q")
        self.skip(n)
        return bytes(self.buf[self.pos - n : self.pos]).decode("utf-8", errors="replace")

    def value(self, kind: int):
        """A metadata value; arrays are skipped (None)."""
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise ValueError(f"unknown metadata value type {kind}")
        item, count = self.take("I"), self.take("Q")
        if item in _SCALARS:
            self.skip(count * struct.calcsize(_SCALARS[item]))
        else:
            for _ in range(count):
                self.value(item)
        return None


def _gguf_tensor(path: Path, cursor: _GGUFHeader) -> tuple[str, tuple[int, ...], int, int]:
    """(name, dims in GGUF order, GGML type id, offset) of one tensor info."""
    name = cursor.string()
    n_dims = cursor.take("I")
    if n_dims > _MAX_DIMS:
        raise refuse(path, f"claims {n_dims} dimensions", _DAMAGED, name)
    dims = tuple(cursor.take("Q") for _ in range(n_dims))
    return name, dims, cursor.take("I"), cursor.take("Q")


def _gguf_entry(
    path: Path, name: str, dims: tuple[int, ...], kind: int, offset: int
) -> TensorEntry | Problem:
    try:
        ggml = GGMLQuantizationType(kind)
        block, size = GGML_QUANT_SIZES[ggml]
    except (ValueError, KeyError):
        return Problem(
            path,
            name,
            f"has GGML type id {kind}, which the installed gguf package does not know",
            "upgrade gguf (pip install -U gguf) or re-export the model with common types",
        )
    numel = int(np.prod(dims, dtype=np.int64)) if dims else 1
    if dims and dims[0] % block:
        return Problem(
            path,
            name,
            f"has rows of {dims[0]} values, not a multiple of {ggml.name}'s block of {block}",
            _DAMAGED,
        )
    return TensorEntry(path, name, ggml.name, tuple(reversed(dims)), offset, numel // block * size)


def gguf_entries(path: Path) -> tuple[list[TensorEntry], dict[str, object]]:
    """(every tensor, the metadata's scalar and string values) of a GGUF; raises
    `CheckpointProblems` for a header the file does not hold, a file with no tensors,
    or a tensor whose data lies past the end of the file."""
    size = path.stat().st_size
    if size < 4:
        raise cut_short(path, f"ends at byte {size}, before the GGUF magic")
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        version = struct.unpack_from("<I", buf, 4)[0] if size >= 8 else 0
        cursor = _GGUFHeader(buf, ">" if version and version & 0xFFFF == 0 else "<")
        try:
            cursor.skip(4)
            version = cursor.take("I")
            if version not in (2, 3):
                raise refuse(path, f"is GGUF version {version}; lqlora reads 2 and 3", _CONVERT)
            n_tensors, n_fields = cursor.take("Q"), cursor.take("Q")
            fields = {}
            for _ in range(n_fields):
                key = cursor.string()
                fields[key] = cursor.value(cursor.take("I"))
            infos = [_gguf_tensor(path, cursor) for _ in range(n_tensors)]
        except _HeaderEnds:
            raise cut_short(path, f"ends at byte {size}, inside its header") from None
        except ValueError as err:
            raise refuse(path, f"has a damaged header ({err})", _DAMAGED) from None
        if cursor.order == ">":
            raise refuse(path, "is a big-endian GGUF; lqlora reads little-endian ones", _CONVERT)
        alignment = fields.get("general.alignment")
        alignment = alignment if isinstance(alignment, int) and alignment > 0 else 32
        start = -(-cursor.pos // alignment) * alignment
    if not infos:
        raise refuse(
            path,
            "holds no tensors: it is a vocabulary-only GGUF (tokenizer and metadata, no weights; "
            "llama.cpp's --vocab-only writes these)",
            "register the full GGUF of the model, the one with its weights",
        )
    entries = [_gguf_entry(path, name, dims, kind, start + offset) for name, dims, kind, offset in infos]
    problems = [e for e in entries if isinstance(e, Problem)]
    problems += [
        Problem(
            path,
            e.name,
            f"lies beyond the end of the file: its data ends at byte {e.offset + e.nbytes}, "
            f"the file has {size}",
            "the file is truncated (an interrupted download or copy); download it again",
        )
        for e in entries
        if isinstance(e, TensorEntry) and e.offset + e.nbytes > size
    ]
    if problems:
        raise CheckpointProblems(problems)
    return entries, fields


def gguf_slices(entry: TensorEntry, max_elements: int = MAX_ELEMENTS) -> Iterator[np.ndarray]:
    """The tensor dequantized to float32 in slices of whole rows (integer types as they
    are stored)."""
    if entry.numel == 0:
        return
    kind = GGMLQuantizationType[entry.dtype]
    rows = entry.numel // entry.shape[-1] if entry.shape else 1
    per_row = entry.nbytes // rows
    data = np.memmap(entry.file, dtype=np.uint8, mode="r", offset=entry.offset, shape=(rows, per_row))
    step = max(1, max_elements // max(1, entry.shape[-1] if entry.shape else 1))
    as_is = {"F64": np.float64, "I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64}
    for row in range(0, rows, step):
        chunk = np.ascontiguousarray(data[row : row + step])
        yield chunk.view(as_is[entry.dtype]) if entry.dtype in as_is else dequantize(chunk, kind)
