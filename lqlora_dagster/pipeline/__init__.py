"""The pipeline stages as plain functions (no dagster): each takes upstream handles and
settings, reuses a stored result when its key exists, otherwise computes and stores
it, and returns a small JSON-able handle. Dagster assets are thin wrappers over these.
"""
