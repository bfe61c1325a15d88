"""The fast path for packed matrices: decode straight from the packed bytes.

A small C++ extension (`kernels/packed_matmul.cpp`), built once per machine by the local
compiler and cached by torch, decodes a matrix in one pass (`dequantize`) or multiplies a
few activation rows by it while decoding (`matvec`), so generating a token reads the
packed bytes instead of a dense copy. Its values are bit-identical to `codec.decode`
(tests/method/test_fast_decode.py checks every config of the grid). Without a compiler,
off the CPU, or with LQLORA_FAST_DECODE=0, callers get None and use the pure-torch decoder.
"""

import threading
from functools import cache

import torch

from lqlora_dagster.quant.native_build import load_extension
from lqlora_dagster.quant.normal_float import nf_codebook

SOURCE = "packed_matmul.cpp"
MATVEC_MAX_ROWS = 16  # activation rows the fused kernel takes; more rows decode once and use mm


@cache
def kernel():
    """The compiled extension, or None when it cannot be built here (said once in the log)."""
    return load_extension("lqlora_packed_matmul", SOURCE, "LQLORA_FAST_DECODE", openmp=True)


def available(device: torch.device) -> bool:
    return device.type == "cpu" and kernel() is not None


def kernel_args(qm) -> tuple:
    """What the extension takes for one matrix (the group steps computed as codec does).
    Layers cache it: building it costs more than decoding a small matrix for one token."""
    cfg = qm.config
    step = (qm.group_scales.to(torch.float32) / (2**cfg.b0 - 1)).contiguous()
    return (qm.packed_codes.contiguous(), qm.packed_scale_codes.contiguous(), step, float(qm.scale_offset[0]),
            nf_codebook(cfg.b), cfg.b, cfg.b0, cfg.B0, cfg.B1, *qm.shape)


def dequantize(qm, args: tuple | None = None) -> torch.Tensor | None:
    """Dense float32 (m, n) weight of a `QuantizedMatrix`, or None without the fast path."""
    if not available(qm.packed_codes.device):
        return None
    return kernel().dequantize(*(args or kernel_args(qm)))


_scratch = threading.local()


def dequantize_scratch(args: tuple) -> torch.Tensor:
    """The dense weight decoded into this thread's reusable buffer, valid until the next
    call: a forward pass decodes one matrix at a time, so one buffer (the largest
    matrix's size) serves them all and no per-layer allocation churns the heap."""
    rows, cols = args[-2:]
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < rows * cols:
        buffer = _scratch.buffer = torch.empty(rows * cols)
    return kernel().dequantize_into(buffer, *args)


def matmul(x: torch.Tensor, qm, args: tuple | None = None) -> torch.Tensor | None:
    """x @ W^T decoding W on the fly for a few float32 rows of x, or None when the fused
    kernel does not apply (the caller then decodes once and uses a dense matmul)."""
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    if x.dtype != torch.float32 or not 0 < rows <= MATVEC_MAX_ROWS or not available(x.device):
        return None
    y = kernel().matvec(x.reshape(rows, x.shape[-1]), *(args or kernel_args(qm)))
    return y.reshape(*x.shape[:-1], qm.shape[0])


def lq_linear(x: torch.Tensor, qm, args: tuple, L1: torch.Tensor, L2: torch.Tensor, scaling: float,
              bias: torch.Tensor | None) -> torch.Tensor | None:
    """A whole LQLinear forward (frozen matmul, low-rank part, bias) for a few float32
    rows in one call, or None when the fused kernel does not apply."""
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    if (x.dtype != torch.float32 or L1.dtype != torch.float32 or not 0 < rows <= MATVEC_MAX_ROWS
            or not available(x.device)):
        return None
    y = kernel().lq_linear(x.reshape(rows, x.shape[-1]), *args, L1, L2, float(scaling),
                           bias if bias is not None else _NO_BIAS)
    return y.reshape(*x.shape[:-1], qm.shape[0])


_NO_BIAS = torch.empty(0)
