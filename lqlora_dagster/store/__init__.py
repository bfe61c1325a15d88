"""Persistence: content-addressed tensor artifacts and the DuckDB warehouse."""
