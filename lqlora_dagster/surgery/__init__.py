"""Turning a model's target layers into frozen-quantized + trainable low-rank layers."""
