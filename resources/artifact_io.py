"""The artifact store resource, and the IO manager for the handles assets return.

Heavy payloads are written by the stages into the content-addressed store (they must
look a key up before computing, which an IO manager cannot do); what passes between
assets is the small handle naming exactly which stored result to read. The IO manager
persists that handle per (asset, partition) and records where it lives.
"""

import json
import os
from pathlib import Path

import dagster as dg

from lqlora_dagster.pipeline.handles import from_json, to_json
from lqlora_dagster.store.artifacts import ArtifactStore
from lqlora_dagster.store.ledger import ArtifactLedger
from lqlora_dagster.store.warehouse import Warehouse


class ArtifactStoreResource(dg.ConfigurableResource):
    root: str

    def store(self, warehouse: Warehouse | None = None) -> ArtifactStore:
        """The store; with the warehouse, checksums are recorded in and checked against DuckDB."""
        return ArtifactStore(Path(self.root), ArtifactLedger(warehouse) if warehouse is not None else None)


class HandleIOManager(dg.ConfigurableIOManager):
    """Asset outputs (handles) per (asset, partition); op outputs inside graph-backed
    assets (plain JSON values) per (run, step, output). JSON only, never pickle."""

    root: str

    def _asset_path(self, context: dg.InputContext | dg.OutputContext) -> Path:
        asset = "/".join(context.asset_key.path)
        return Path(self.root) / asset / f"{self._partition(context)}.json"

    @staticmethod
    def _partition(context: dg.InputContext | dg.OutputContext) -> str:
        if not context.has_asset_partitions:
            return "_"
        if isinstance(context, dg.InputContext) and context.has_partition_key:
            # asset checks are not partitioned: Dagster hands them every partition of the
            # asset; inside a partitioned run the one they check is the run's own
            if len(context.asset_partition_keys) != 1:
                return context.partition_key
        return context.asset_partition_key

    def _op_path(self, output: dg.OutputContext) -> Path:
        return Path(self.root).joinpath("_ops", *output.get_identifier()).with_suffix(".json")

    def handle_output(self, context: dg.OutputContext, obj) -> None:
        if context.has_asset_key:
            path, text = self._asset_path(context), to_json(obj)
        else:
            path, text = self._op_path(context), json.dumps(obj)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        if context.has_asset_key:
            context.add_output_metadata({"handle_path": dg.MetadataValue.path(str(path))})

    def load_input(self, context: dg.InputContext):
        if not context.has_asset_key:
            return json.loads(self._op_path(context.upstream_output).read_text())
        path = self._asset_path(context)  # the upstream asset and partition
        if not path.is_file():
            raise dg.Failure(
                f"no stored result of {context.asset_key.to_user_string()} for this partition at {path}; "
                "materialize it first"
            )
        return from_json(path.read_text())
