"""A real Dagster run in its own process, for the crash tests to kill.

    python -m tests.resilience.crash_driver HOME PARTITION LAST_ASSET RUN_CONFIG_JSON

RUN_CONFIG_JSON is the {"op": {"config": ...}} part of the run config. Materializes LAST_ASSET and everything upstream of it for PARTITION in the persistent
instance under HOME/dagster, with the in-process executor (one process to kill).
Progress lines go to stderr through Dagster's console logger.

With PAUSE_AFTER_STEP=k in the environment, finetuning stops after step k (its progress
line written, its checkpoint, if k is a checkpoint step, not yet) and prints
`crash_driver: paused after step k`: the test kills it there, at a known point, instead of
racing the next checkpoint. The pause wraps the trainer's `on_step` callback; the product
code has no test branch.
"""

import json
import os
import sys
import threading
from pathlib import Path

PAUSE_AFTER_STEP = "PAUSE_AFTER_STEP"
PAUSED = "crash_driver: paused after step {}"


def pause_finetuning_after(step: int) -> None:
    """Make every caller of the trainer block after `step`: the modules that imported it
    already, and those that import it later."""
    from lqlora_dagster.training import finetune as training

    original = training.finetune

    def finetune(*args, on_step=None, **kwargs):
        def on_step_then_pause(record) -> None:
            if on_step is not None:
                on_step(record)
            if record.step == step:
                print(PAUSED.format(step), file=sys.stderr, flush=True)
                threading.Event().wait()  # until the test's SIGKILL

        return original(*args, on_step=on_step_then_pause, **kwargs)

    training.finetune = finetune
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("lqlora_dagster") and getattr(module, "finetune", None) is original:
            module.finetune = finetune


def main(home: str, partition: str, last_asset: str, run_config: str) -> int:
    os.environ["LQLORA_HOME"] = home
    import dagster as dg

    from assets.runs import add_partition, prepare_dagster_home
    from lqlora_dagster.definitions import build_definitions, resources_at

    if os.environ.get(PAUSE_AFTER_STEP):
        pause_finetuning_after(int(os.environ[PAUSE_AFTER_STEP]))
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
