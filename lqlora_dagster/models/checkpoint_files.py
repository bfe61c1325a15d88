"""What an HF folder's safetensors files say they hold, read from their headers alone,
and their values read back one slice at a time.

A safetensors file is an 8-byte header length, a JSON header naming each tensor's
dtype, shape and byte range, then the data; a sharded folder adds an index naming the
file of each tensor. Both are read here without trusting them: a file cut short, a
header that points past its end or an index naming a missing shard becomes a `Problem`
naming the file (and the tensor), never a reader's error from deep inside a run. Values
come back in slices of whole rows (`max_elements` at most), so memory stays at one
slice whatever the model. `gguf_file` does the same for GGUF.
"""

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

MAX_ELEMENTS = 1 << 24  # one slice: 64 MB of float32
# bytes per element of safetensors dtypes (the F8/F4 formats pack 8 bits or fewer)
SAFETENSORS_BYTES = {
    **dict.fromkeys(("F64", "I64", "U64"), 8),
    **dict.fromkeys(("F32", "I32", "U32"), 4),
    **dict.fromkeys(("F16", "BF16", "I16", "U16"), 2),
    **dict.fromkeys(("I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"), 1),
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}  # what a float parameter may be stored as
_DAMAGED = "the file is damaged or not a safetensors file; download or copy it again"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint: where, what was found, and what to do."""

    file: Path
    tensor: str | None  # None: the file as a whole
    found: str
    fix: str

    def line(self) -> str:
        where = f"{self.file}: tensor {self.tensor}" if self.tensor else str(self.file)
        return f"{where} {self.found}; {self.fix}"


class CheckpointProblems(Exception):
    """Problems that stop reading a checkpoint's files any further."""

    def __init__(self, problems: list[Problem]):
        super().__init__("; ".join(p.line() for p in problems))
        self.problems = problems


@dataclass(frozen=True)
class TensorEntry:
    """One stored tensor as its file's header describes it."""

    file: Path
    name: str  # the name in the file
    dtype: str  # safetensors dtype ("F32") or GGML type name ("Q4_1")
    shape: tuple[int, ...]  # in PyTorch's order (a GGUF's dims reversed)
    offset: int  # absolute byte offset of its data in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


def shape_text(shape: tuple[int, ...]) -> str:
    return " x ".join(map(str, shape)) if shape else "scalar"


def refuse(path: Path, found: str, fix: str, tensor: str | None = None) -> CheckpointProblems:
    """One problem that stops the reading."""
    return CheckpointProblems([Problem(path, tensor, found, fix)])


def cut_short(path: Path, found: str) -> CheckpointProblems:
    return refuse(path, found, "the download or copy was cut short; download or copy it again")


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """(header without __metadata__, byte offset where the data starts)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise cut_short(path, f"is truncated: {size} bytes, too short for a safetensors header")
        length = int.from_bytes(head, "little")
        if 8 + length > size:
            raise cut_short(path, f"is truncated: its header needs {length} bytes but only {size - 8} follow")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise refuse(path, f"has a header that is not JSON ({err})", _DAMAGED) from None
    if not isinstance(header, dict):
        raise refuse(path, "has a header that is not a JSON object", _DAMAGED)
    header.pop("__metadata__", None)
    return header, 8 + length


def _safetensors_entry(path: Path, name: str, info: object, start: int) -> TensorEntry | Problem:
    try:
        dtype, shape, (begin, end) = info["dtype"], tuple(int(n) for n in info["shape"]), info["data_offsets"]
        begin, end = int(begin), int(end)
    except (TypeError, KeyError, ValueError):
        return Problem(path, name, f"has a malformed header entry {info!r}", _DAMAGED)
    entry = TensorEntry(path, name, str(dtype), shape, start + begin, end - begin)
    width = SAFETENSORS_BYTES.get(entry.dtype)
    if begin < 0 or end < begin or (width is not None and entry.nbytes != entry.numel * width):
        return Problem(
            path,
            name,
            f"has {entry.nbytes} bytes in its header for a {shape_text(shape)} {dtype} tensor",
            _DAMAGED,
        )
    return entry


def safetensors_entries(path: Path) -> list[TensorEntry]:
    """Every tensor of one file; raises `CheckpointProblems` unless the header covers the
    file exactly (a truncated download fails here, not in the middle of a run)."""
    header, start = _safetensors_header(path)
    entries = [_safetensors_entry(path, name, info, start) for name, info in header.items()]
    bad = [e for e in entries if isinstance(e, Problem)]
    if bad:
        raise CheckpointProblems(bad)
    data = path.stat().st_size - start
    end = max((e.offset + e.nbytes - start for e in entries), default=0)
    if end > data:
        past = sum(e.offset + e.nbytes - start > data for e in entries)
        raise cut_short(
            path,
            f"is truncated: its header describes {end} bytes of tensor data but only {data} follow it "
            f"({past} of {len(entries)} tensors lie past the end)",
        )
    if end < data:
        raise refuse(path, f"holds {data - end} bytes after its last tensor", _DAMAGED)
    return entries


def safetensors_slices(entry: TensorEntry, max_elements: int = MAX_ELEMENTS) -> Iterator[torch.Tensor]:
    """The tensor in slices of whole rows (of its first dimension)."""
    with safe_open(str(entry.file), "pt") as f:
        if len(entry.shape) == 0:
            yield f.get_tensor(entry.name)
            return
        piece = f.get_slice(entry.name)
        per_row = max(1, entry.numel // max(1, entry.shape[0]))
        step = max(1, max_elements // per_row)
        for row in range(0, entry.shape[0], step):
            yield piece[row : row + step]


def _index_entries(folder: Path, index: Path) -> tuple[list[Path], dict[str, str], list[Problem]]:
    """(shard files, weight map, problems) of a sharded checkpoint's index."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise refuse(index, "is not a valid index (a JSON object with a weight_map)", _DAMAGED) from None
    files = sorted({folder / str(name) for name in weight_map.values()})
    problems = [
        Problem(
            index, None, f"names {f.name}, which does not exist in {folder}", "download the missing shard"
        )
        for f in files
        if not f.is_file()
    ]
    return [f for f in files if f.is_file()], weight_map, problems


def _weight_files(folder: Path) -> tuple[list[Path], dict[str, str], list[Problem]]:
    """(files, weight map, problems): the files transformers loads, looked up as it does,
    model.safetensors first, then the index's shards; no other name."""
    for link in sorted(folder.glob("*.safetensors")):
        if link.is_symlink() and not link.exists():
            raise refuse(
                link,
                f"is a link to {os.readlink(link)}, which does not exist",
                "the download is incomplete (a hub cache copied without its blobs?); download the model again",
            )
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return [single], {}, []
    if index.is_file():
        return _index_entries(folder, index)
    others = ", ".join(sorted(p.name for p in folder.glob("*.safetensors"))[:3])
    raise refuse(
        folder,
        f"holds {others} but neither model.safetensors nor model.safetensors.index.json, "
        "the only names transformers loads weights from",
        "rename a single weights file to model.safetensors",
    )


def folder_entries(folder: Path) -> list[TensorEntry]:
    """Every tensor of an HF folder's weight files (one file, or the index's shards)."""
    files, weight_map, problems = _weight_files(folder)
    entries: list[TensorEntry] = []
    for path in files:
        try:
            entries += safetensors_entries(path)
        except CheckpointProblems as err:
            problems += err.problems
    stored = {(e.file, e.name) for e in entries}
    problems += [
        Problem(
            folder / str(name),
            key,
            "is missing from the shard the index places it in",
            "download that shard again",
        )
        for key, name in weight_map.items()
        if (folder / str(name)).is_file() and (folder / str(name), key) not in stored
    ]
    if problems:
        raise CheckpointProblems(problems)
    return entries
