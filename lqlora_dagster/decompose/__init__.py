"""Quantized + low-rank decompositions of weight matrices."""
