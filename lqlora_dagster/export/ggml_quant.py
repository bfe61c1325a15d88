"""llama.cpp's own quantizers and dequantizers, called in its ggml library.

The bytes an export writes come from the same C functions `llama-quantize` runs
(`ggml_quantize_chunk`, with an importance vector per input column when given), and the
values an export is scored on from the same `to_float` llama.cpp dequantizes with, so
the error table prices exactly what the file will hold. The library is the one
llama-cpp-python builds from source; nothing else is loaded.
"""

import ctypes
import functools
from pathlib import Path

import numpy as np

from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.export.ggml_types import GGMLType

INSTALL = "install llama-cpp-python (`./.ci/setup-env.sh` builds it from source)"


class _TypeTraits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


def llama_cpp_lib_dir() -> Path:
    try:
        import llama_cpp  # noqa: F401  (an optional extra: only exports load it)
    except ImportError as err:
        raise LQLoRAInputError(f"GGUF export needs llama.cpp's library: {INSTALL}") from err
    return Path(llama_cpp.__file__).parent / "lib"


@functools.cache
def _lib() -> ctypes.CDLL:
    folder = llama_cpp_lib_dir()
    found = sorted(folder.glob("libggml-base.*")) or sorted(folder.glob("ggml-base.*"))
    if not found:
        raise LQLoRAInputError(f"{folder} holds no libggml-base; reinstall llama-cpp-python ({INSTALL})")
    lib = ctypes.CDLL(str(found[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    return lib


def available() -> bool:
    try:
        _lib()
    except LQLoRAInputError:
        return False
    return True


def quantize(weight: np.ndarray, kind: GGMLType, importance: np.ndarray | None = None) -> np.ndarray:
    """The bytes of a (rows, row_length) float32 matrix in `kind`, as llama-quantize writes
    them. `importance` (row_length,) weighs the input columns in the scale search."""
    lib = _lib()
    w = np.ascontiguousarray(weight, dtype=np.float32)
    if w.ndim != 2 or not kind.fits(w.shape[1]):
        raise LQLoRAInputError(f"{kind.name} needs rows that are a multiple of {kind.block}; got shape {w.shape}")
    rows, n = w.shape
    imatrix = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
    if imatrix is not None and imatrix.shape != (n,):
        raise ValueError(f"importance has shape {imatrix.shape}, expected ({n},)")
    out = np.empty(rows * lib.ggml_row_size(int(kind.ggml), n), dtype=np.uint8)
    written = lib.ggml_quantize_chunk(int(kind.ggml), w.ctypes.data, out.ctypes.data, 0, rows, n,
                                      None if imatrix is None else imatrix.ctypes.data)
    if written != out.size:
        raise RuntimeError(f"ggml wrote {written} bytes for {kind.name} {w.shape}, expected {out.size}")
    return out


def dequantize(data: np.ndarray, kind: GGMLType, shape: tuple[int, int]) -> np.ndarray:
    """The float32 values llama.cpp reads back from `data` (bytes of `kind`)."""
    traits = _lib().ggml_get_type_traits(int(kind.ggml)).contents
    n = shape[0] * shape[1]
    out = np.empty(n, dtype=np.float32)
    raw = np.ascontiguousarray(data)
    if not traits.to_float:
        raise ValueError(f"ggml has no dequantizer for {kind.name}")
    _TO_FLOAT(traits.to_float)(raw.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n)
    return out.reshape(shape)
