"""The artifact ledger: every committed artifact's checksums, recorded in DuckDB.

The sidecar JSON next to an artifact says what was written; the ledger row says the
same thing in the system of record, where a user can query it and where a file and
its sidecar altered together (or a sidecar rewritten by hand) are still caught.
"""

import json

import pandas as pd

from lqlora_dagster.store.warehouse import Warehouse


class ArtifactLedger:
    def __init__(self, warehouse: Warehouse):
        self.warehouse = warehouse

    def record(self, path: str, asset: str, partition: str, key: str, sha256: dict[str, str], nbytes: int) -> None:
        row = {
            "path": path,
            "asset": asset,
            "partition": partition,
            "key": key,
            "sha256": json.dumps(sha256, sort_keys=True),
            "nbytes": nbytes,
        }
        self.warehouse.upsert("artifacts", pd.DataFrame([row]), ["path"])

    def checksums(self, path: str) -> dict[str, str] | None:
        """The recorded {file: sha256} for an artifact path, or None if never recorded."""
        rows = self.warehouse.query("SELECT sha256 FROM artifacts WHERE path = ?", [path])
        return None if rows.empty else json.loads(rows["sha256"].iloc[0])

    def forget(self, path: str) -> None:
        self.warehouse.replace_rows("artifacts", pd.DataFrame(), {"path": path})
