"""Exact error-table rows on demand, for confirming plans made on a fast table.

The exact rows are the exhaustive table's (`TableRef.exact_key`): one cold-start
decomposition per config, the very iterates the decomposition stage runs. They are
looked up in `quant_errors` first, computed when missing (several matrices at a time,
one torch thread each, as every stage does) and committed matrix by matrix, so a
crash loses at most the matrices in flight, and later plans (or an exhaustive run of
the table) reuse them.
"""

import dataclasses
import time
from collections import defaultdict

from lqlora_dagster.allocate.confirm import ExactRows, Row
from lqlora_dagster.decompose.lq import LQSettings
from lqlora_dagster.error_table import ConfigError, exhaustive_errors
from lqlora_dagster.methods import get_method
from lqlora_dagster.models.weights import read_target_weights
from lqlora_dagster.per_matrix_threads import one_thread_per_matrix
from lqlora_dagster.pipeline.base_model import recorded_targets
from lqlora_dagster.pipeline.context import StageContext
from lqlora_dagster.pipeline.error_table import fisher_tensors, table_rows
from lqlora_dagster.pipeline.handles import ModelHandle, TableRef
from lqlora_dagster.quant.config import QuantConfig
from lqlora_dagster.store.schemas import QUANT_ERRORS


def exact_rows(ctx: StageContext, model: ModelHandle, ref: TableRef, settings: LQSettings) -> ExactRows:
    """A function giving the exact error of (matrix, config) rows of `ref`'s table."""
    if ref.exact_key is None:
        raise ValueError(f"table {ref.table_key} of {ref.method} is exact already; nothing to confirm")
    exact_ref = dataclasses.replace(ref, table_key=ref.exact_key, exact_key=None)
    method = get_method(ref.method)
    targets = {t.name: t for t in recorded_targets(ctx, model.model)}

    def lookup(rows: list[Row]) -> dict[Row, float]:
        names = sorted({m for m, _ in rows})
        found = ctx.warehouse.query(
            "SELECT matrix, config, error FROM quant_errors WHERE table_key = ? AND list_contains(?, matrix)",
            [ref.exact_key, names],
        )
        known = dict(zip(zip(found["matrix"], found["config"]), found["error"].astype(float)))
        return {row: known[row] for row in rows if row in known}

    def compute(rows: list[Row]) -> dict[Row, float]:
        out = lookup(rows)
        todo: dict[str, list[str]] = defaultdict(list)
        for m, c in rows:
            if (m, c) not in out:
                todo[m].append(c)
        if not todo:
            return out
        start = time.perf_counter()
        weights = read_target_weights(model.folder, [targets[m] for m in sorted(todo)])
        fishers = fisher_tensors(ctx, model.model, ref.fisher_key, set(todo) if method.fisher else set())

        def errors_of(name: str) -> list[ConfigError]:
            W = weights.pop(name).to(ctx.device)
            F = fishers.pop(name).to(ctx.device) if method.fisher else None
            return exhaustive_errors(W, tuple(QuantConfig.parse(c) for c in todo[name]), method, settings, F)

        finished = one_thread_per_matrix(errors_of, sorted(todo), ctx.matrix_workers)
        for i, (name, results) in enumerate(finished, 1):
            frame = QUANT_ERRORS.validate(table_rows(exact_ref, method, model, targets[name], results))
            ctx.warehouse.upsert("quant_errors", frame, ["table_key", "matrix", "config"])
            out.update({(name, r.config.name): float(r.error) for r in results})
            if i % 50 == 0 or i == len(todo):
                ctx.log(
                    f"confirm {ref.method}: exact rows for {i}/{len(todo)} matrices, "
                    f"{time.perf_counter() - start:.0f}s"
                )
        return out

    return compute
