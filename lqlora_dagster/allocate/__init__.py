"""Choosing a quantization config per matrix under a bits-per-parameter budget."""
