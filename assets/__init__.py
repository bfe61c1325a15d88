"""Dagster assets, one module per pipeline stage; each is a thin wrapper over
lqlora_dagster.pipeline.<stage>."""
