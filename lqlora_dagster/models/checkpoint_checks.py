"""Registration's check of a whole checkpoint, before anything is stored.

Three passes, cheapest first, each naming the file and the tensor it faults:
1. the files are complete (`checkpoint_files`, `gguf_file`: headers that cover their
   files, a GGUF with tensors whose data lies inside it, every shard an index names);
2. the checkpoint fits the architecture built from its config on the meta device: every
   tensor the model needs is stored (under transformers' own renamings, so older names
   still match), with its shape and a floating dtype;
3. every stored tensor is finite, read one slice at a time, embeddings and norms as
   much as the target weights (a NaN there would otherwise surface hours later as a
   NaN Fisher statistic).
Weights loaded at run time then hold no surprise that registration could have seen.
"""

import contextlib
import functools
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import SafetensorError

from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.models.checkpoint_files import (
    FLOAT_DTYPES,
    MAX_ELEMENTS,
    CheckpointProblems,
    Problem,
    TensorEntry,
    folder_entries,
    safetensors_slices,
    shape_text,
)
from lqlora_dagster.models.gguf_file import gguf_entries, gguf_slices
from lqlora_dagster.models.source import ParsedSource

_GGUF_INTEGERS = {"I8", "I16", "I32", "I64"}  # every other GGML type dequantizes to floats
_FIXES = {  # (what, is a GGUF) -> what to do
    ("missing", False): "the checkpoint is incomplete or made for another architecture; download it again, "
    "or use the config.json that came with these weights",
    (
        "missing",
        True,
    ): "the GGUF is incomplete or was converted for another architecture; convert the model again",
    (
        "shape",
        False,
    ): "the weights and config.json do not belong together; use the config that came with them",
    ("shape", True): "the GGUF's metadata and tensors disagree; convert the model again",
}
_SHOWN = 10  # problems listed in one message
_ANNOUNCE_BYTES = 1 << 30  # checkpoints above this say they are being read


def report(source: str, problems: list[Problem]) -> LQLoRAInputError:
    """One error listing what is wrong and where (the first few problems, then a count)."""
    lines = [p.line() for p in problems[:_SHOWN]]
    if len(problems) > _SHOWN:
        lines.append(f"... and {len(problems) - _SHOWN} more")
    if len(lines) == 1:
        return LQLoRAInputError(f"cannot register {source}, nothing was stored: {lines[0]}")
    return LQLoRAInputError(
        f"cannot register {source}, nothing was stored; {len(problems)} problems:\n  " + "\n  ".join(lines)
    )


# --- 1. the files -----------------------------------------------------------------------------


def _unreadable(parsed: ParsedSource, err: OSError) -> Problem:
    path = Path(err.filename) if err.filename else parsed.folder
    return Problem(
        path, None, f"cannot be read ({err.strerror or err})", "make it readable (permissions, disk)"
    )


def checkpoint_entries(parsed: ParsedSource) -> tuple[list[TensorEntry], dict[str, object]]:
    """(every stored tensor, a GGUF's metadata or {}); raises for incomplete files."""
    try:
        if parsed.gguf_file is not None:
            return gguf_entries(parsed.folder / parsed.gguf_file)
        return folder_entries(parsed.folder), {}
    except CheckpointProblems as err:
        raise report(parsed.key, err.problems) from None
    except OSError as err:
        raise report(parsed.key, [_unreadable(parsed, err)]) from None


# --- 2. the architecture ---------------------------------------------------------------------


def _renamer(net: torch.nn.Module) -> Callable[[str], tuple[str, bool]]:
    """checkpoint key -> (model key, whether a converter merges it with others), as
    transformers renames keys when it loads (legacy names, a missing base prefix)."""
    # transformers loads on first use (0.6 s): commands that read no model skip it
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(net)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    meta, prefix = net.state_dict(), getattr(net, "base_model_prefix", None) or None

    def rename(key: str) -> tuple[str, bool]:
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if renamed not in meta and key in meta:
            renamed, pattern = rename_source_key(key, [], [], prefix, meta)
        return renamed, pattern is not None

    return rename


def _optional(net: torch.nn.Module, fresh_head: bool) -> Callable[[str, set[str]], bool]:
    """Whether the model may lack a key, given the keys found: a tied copy whose partner
    is stored, one transformers' ignore list names, or a classifier head drawn fresh."""
    tied = dict(getattr(net, "all_tied_weights_keys", None) or {})
    partner = {**tied, **{source: target for target, source in tied.items()}}
    ignore = [re.compile(p) for p in getattr(net, "_keys_to_ignore_on_load_missing", None) or ()]
    prefix = getattr(net, "base_model_prefix", "")

    def optional(key: str, found: set[str]) -> bool:
        return (
            partner.get(key) in found
            or any(p.search(key) for p in ignore)
            or (fresh_head and bool(prefix) and not key.startswith(f"{prefix}."))
        )

    return optional


def _missing(
    net: torch.nn.Module, found: set[str], optional, where: Path, needs: str, stored_as: dict[str, str]
) -> list[Problem]:
    """The parameters the model needs that no stored tensor fills (`stored_as`: a GGUF's
    name of each). Buffers may be absent: their constructor computes them."""
    fix = _FIXES["missing", bool(stored_as)]
    return [
        Problem(
            where,
            key,
            f"({shape_text(tuple(param.shape))}) is missing"
            + (f" (no {stored_as[key]} in the file)" if key in stored_as else "")
            + f": {needs} needs it",
            fix,
        )
        for key, param in net.named_parameters(remove_duplicate=False)
        if key not in found and not optional(key, found)
    ]


def _entry_problems(
    entry: TensorEntry, model_key: str, param: torch.Tensor, needs: str, exact: bool
) -> list[Problem]:
    """A stored tensor against the parameter it fills: its dtype, then its shape (or, for
    a GGUF, whose layouts transformers permutes, its number of values)."""
    want = tuple(param.shape)
    what = "" if model_key == entry.name else f" for {model_key}"
    floating = entry.dtype in FLOAT_DTYPES if exact else entry.dtype not in _GGUF_INTEGERS
    if param.is_floating_point() and not floating:
        return [
            Problem(
                entry.file,
                entry.name,
                f"is stored as {entry.dtype}, but {needs} needs a floating-point tensor{what}",
                "register the float checkpoint (F32, F16 or BF16), not a quantized or integer export",
            )
        ]
    same = entry.shape == want if exact else entry.numel == param.numel()
    if same:
        return []
    return [
        Problem(
            entry.file,
            entry.name,
            f"has shape {shape_text(entry.shape)}, but {needs} needs {shape_text(want)}{what}",
            _FIXES["shape", not exact],
        )
    ]


@contextlib.contextmanager
def _name_maps_built_once():
    """transformers' GGUF name mapping rebuilds gguf's name table for every submodule
    (397 times, 11 s, for SmolLM2); the table depends only on (architecture, blocks), so
    it is cached for the call. Same result, same function: a pure one, memoized."""
    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.cache(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def _gguf_names(net: torch.nn.Module, config, fields: dict[str, object]) -> dict[str, str]:
    """GGUF tensor name -> model key, as transformers maps them when it loads a GGUF."""
    # transformers loads on first use (0.6 s): commands that read no model skip it
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    processor = TENSOR_PROCESSORS.get(str(fields.get("general.architecture")), TensorProcessor)
    with _name_maps_built_once():
        names = get_gguf_hf_weights_map(net, processor(config=config.to_dict()))
    if "lm_head.weight" in net.state_dict():  # GPT-2's processor renames its output itself
        names.setdefault("output.weight", "lm_head.weight")
    return names


def architecture_problems(
    net: torch.nn.Module,
    entries: list[TensorEntry],
    where: Path,
    fresh_head: bool,
    gguf: tuple[object, dict[str, object]] | None = None,
) -> list[Problem]:
    """Every tensor `net` (built on meta from the checkpoint's config) needs is stored,
    with a matching shape and a floating dtype. `gguf`: (config, metadata) of a GGUF."""
    meta = net.state_dict()
    needs = f"{type(net).__name__} built from {'the GGUF metadata' if gguf else 'config.json'}"
    if gguf is not None:
        try:
            names = _gguf_names(net, *gguf)
        except NotImplementedError as err:  # transformers' own GGUF loading fails the same way
            fix = "convert the model to an HF folder (config.json + model.safetensors) and register that"
            return [Problem(where, None, f"has tensor names transformers cannot map ({err})", fix)]
        keyed = [(names[e.name], False, e) for e in entries if e.name in names]
        stored_as = {key: name for name, key in names.items()}
    else:
        rename = _renamer(net)
        keyed = [(*rename(e.name), e) for e in entries]
        stored_as = {}
    found = {key for key, _, _ in keyed if key in meta}
    problems = _missing(net, found, _optional(net, fresh_head), where, needs, stored_as)
    for key, merged, entry in keyed:
        if key in meta and not merged and "_exps" not in entry.name:  # merged experts: no 1:1 shape
            problems += _entry_problems(entry, key, meta[key], needs, exact=gguf is None)
    return problems


# --- 3. the values ----------------------------------------------------------------------------


def _count_bad(values: torch.Tensor | np.ndarray) -> tuple[int, int]:
    """(NaN, Inf) counts of one slice (0, 0 for integer data). The common all-finite case
    costs one max (it propagates NaN and Inf), several times faster than counting."""
    if isinstance(values, np.ndarray):
        if not np.issubdtype(values.dtype, np.floating) or np.isfinite(values).all():
            return 0, 0
        return int(np.isnan(values).sum()), int(np.isinf(values).sum())
    if not values.is_floating_point() or values.numel() == 0 or torch.isfinite(values.abs().amax()):
        return 0, 0
    return int(torch.isnan(values).sum()), int(torch.isinf(values).sum())


def _tensor_problem(entry: TensorEntry, max_elements: int) -> Problem | None:
    slices = gguf_slices if entry.file.suffix.lower() == ".gguf" else safetensors_slices
    nan = inf = 0
    try:
        for values in slices(entry, max_elements):
            n, i = _count_bad(values)
            nan, inf = nan + n, inf + i
    except NotImplementedError as err:  # a GGML type gguf-py cannot dequantize
        return Problem(
            entry.file,
            entry.name,
            f"cannot be read: {err}",
            "upgrade gguf (pip install -U gguf) or re-export the model with common types (F16, Q8_0, Q4_K)",
        )
    except (SafetensorError, OSError) as err:
        return Problem(entry.file, entry.name, f"cannot be read: {err}", "the file is damaged; replace it")
    if not nan and not inf:
        return None
    return Problem(
        entry.file,
        entry.name,
        f"has {nan} NaN and {inf} Inf values (shape {shape_text(entry.shape)})",
        "the checkpoint is corrupt or was saved after a diverged step; use an earlier or intact one",
    )


def finite_problems(entries: Iterable[TensorEntry], max_elements: int = MAX_ELEMENTS) -> list[Problem]:
    """Every stored tensor read once, a slice of at most `max_elements` values at a time:
    the ones holding NaN or Inf, with their counts."""
    problems = (_tensor_problem(entry, max_elements) for entry in entries)
    return [p for p in problems if p is not None]


def check_checkpoint(
    parsed: ParsedSource, net: torch.nn.Module, config, entries: list[TensorEntry], fields: dict[str, object]
) -> None:
    """Passes 2 and 3 over the entries `checkpoint_entries` read (pass 1); raises one
    error listing every problem."""
    gguf = (config, fields) if parsed.gguf_file is not None else None
    where = parsed.folder / parsed.gguf_file if parsed.gguf_file is not None else parsed.folder
    problems = architecture_problems(net, entries, where, parsed.task == "seq-cls", gguf)
    total = sum(e.nbytes for e in entries)
    if total > _ANNOUNCE_BYTES:
        print(
            f"reading all {len(entries)} tensors ({total / 1e9:.1f} GB) of {parsed.key} to check them",
            file=sys.stderr,
            flush=True,
        )
    problems += finite_problems(entries)
    if problems:
        raise report(parsed.key, problems)
