"""A real Dagster run in its own process, for the crash tests to kill.

    python -m tests.resilience.crash_driver HOME PARTITION LAST_ASSET RUN_CONFIG_JSON

RUN_CONFIG_JSON is the {"op": {"config": ...}} part of the run config. Materializes LAST_ASSET and everything upstream of it for PARTITION in the persistent
instance under HOME/dagster, with the in-process executor (one process to kill).
Progress lines go to stderr through Dagster's console logger.
"""

import json
import os
import sys
from pathlib import Path


def main(home: str, partition: str, last_asset: str, run_config: str) -> int:
    os.environ["LQLORA_HOME"] = home
    import dagster as dg

    from assets.runs import add_partition, prepare_dagster_home
    from lqlora_dagster.definitions import build_definitions, resources_at

    prepare_dagster_home(Path(home))
    add_partition(partition)
    defs = build_definitions(Path(home))
    with dg.DagsterInstance.get() as instance:
        result = dg.materialize(
            list(defs.assets),
            instance=instance,
            partition_key=partition,
            resources=resources_at(Path(home)),
            run_config={"ops": json.loads(run_config)},
            selection=dg.AssetSelection.assets(last_asset).upstream(),
            raise_on_error=False,
        )
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
