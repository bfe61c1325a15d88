"""NormalFloat quantization with double-quantized scales."""

from lqlora_dagster.quant.codec import simulate
from lqlora_dagster.quant.config import CONFIG_GRID, QLORA_NF3, QLORA_NF4, REDUCED_GRID, QuantConfig
from lqlora_dagster.quant.matrix import QuantizedMatrix

__all__ = [
    "CONFIG_GRID",
    "QLORA_NF3",
    "QLORA_NF4",
    "REDUCED_GRID",
    "QuantConfig",
    "QuantizedMatrix",
    "simulate",
]
