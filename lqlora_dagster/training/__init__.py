"""Finetuning the low-rank factors (and optionally a task head)."""
