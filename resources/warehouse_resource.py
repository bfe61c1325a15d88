"""The DuckDB warehouse as a Dagster resource (dagster-duckdb's DuckDBResource), with
our retry-on-lock, short-connection access on top."""

from dagster_duckdb import DuckDBResource

from lqlora_dagster.store.warehouse import Warehouse


class WarehouseResource(DuckDBResource):
    """`database` is the DuckDB file; `warehouse()` gives the locking-safe helper."""

    lock_timeout_s: float = 120.0

    def warehouse(self) -> Warehouse:
        w = Warehouse(self.database, self.lock_timeout_s)
        w.init_schema()
        return w
