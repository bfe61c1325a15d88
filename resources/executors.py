"""The executors a deployment picks from, by name: one dict, no branches in the assets.

"dask" is dagster-dask's executor (a LocalCluster or an existing scheduler, chosen in
the run config), behind one adapter: runs of a dynamically partitioned job carry a
`KeyRangesPartitionsSubset` record that current dask's task-spec parser tries to
iterate (it walks every tuple argument of `Client.submit`, and the run is a
NamedTuple), which fails every partitioned run. The adapter ships the run without
that subset; the partition still travels in the run's `dagster/partition` tag, which
is what the steps read.
"""

import dagster as dg


def _dask_executor() -> dg.ExecutorDefinition:
    # the optional [dask] extra, imported only when its executor is chosen
    from dagster_dask import dask_executor
    from dagster_dask.executor import DaskExecutor

    class PartitionTagOnlyDaskExecutor(DaskExecutor):
        def execute(self, plan_context, execution_plan):
            run = plan_context.dagster_run
            if run.partitions_subset is not None:
                plain = run._replace(partitions_subset=None)
                plan_context._plan_data = plan_context.plan_data._replace(dagster_run=plain)
            return super().execute(plan_context, execution_plan)

    @dg.executor(name="dask", config_schema=dask_executor.config_schema)
    def partition_safe_dask_executor(init_context):
        ((cluster_type, cluster_config),) = init_context.executor_config["cluster"].items()
        return PartitionTagOnlyDaskExecutor(cluster_type, cluster_config)

    return partition_safe_dask_executor


def executor_named(name: str) -> dg.ExecutorDefinition:
    """ "multiprocess" (default, one process per step), "in_process", or "dask" (needs
    the `dask` extra)."""
    if name == "dask":
        return _dask_executor()
    executors = {"multiprocess": dg.multiprocess_executor, "in_process": dg.in_process_executor}
    if name not in executors:
        raise ValueError(f"unknown executor {name!r}; use one of {sorted(executors) + ['dask']}")
    return executors[name]
