"""A merged model to one GGUF file with an ILP-chosen llama.cpp type per target.

converter (model and Fisher twin, float32) -> (tensor, type) error table -> ILP under
the budget -> the file. The budget is bits per target weight, or the whole file's size
(the other tensors and the header are counted first, what is left is the targets').
"""

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from gguf import GGUFReader

from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.export.ggml_types import GGMLType, ggml_type
from lqlora_dagster.export.gguf_mix import Written, marked_targets, non_target_bytes, type_table, write_mixed
from lqlora_dagster.export.hf_to_gguf import convert


@dataclass(frozen=True)
class GGUFPlan:
    picks: dict[str, str]  # GGUF tensor -> type
    objective: float  # Fisher-weighted squared error of the picks
    target_bits: float  # bits per target weight achieved
    table: pd.DataFrame  # the (tensor, type) rows it chose from
    notes: list[str] = field(default_factory=list)


def target_budget(bits: float | None, max_bytes: int | None, other_bytes: int, target_numel: int) -> float:
    """Bits per target weight the plan may spend."""
    if max_bytes is None:
        return float(bits)
    left = max_bytes - other_bytes
    if left <= 0:
        raise LQLoRAInputError(
            f"a file of at most {max_bytes / 1e6:.2f} MB cannot hold even the tensors that are not targets "
            f"({other_bytes / 1e6:.2f} MB with the header); allow more, or a smaller --other-type"
        )
    return 8 * left / target_numel


def plan_types(table: pd.DataFrame, budget_bits: float) -> tuple[dict[str, str], float, float]:
    # pyomo and HiGHS load only when a plan is solved
    from lqlora_dagster.allocate.ilp import solve_ilp

    cheapest = table.groupby("matrix")["storage_bits"].min().sum() / table.groupby("matrix")["numel"].first().sum()
    if budget_bits + 1e-9 < cheapest:
        raise LQLoRAInputError(
            f"no mix of the allowed llama.cpp types fits {budget_bits:.3f} bits per target weight: the smallest "
            f"is {cheapest:.3f}; raise --bits / --max-size or allow smaller types (--types)"
        )
    found = solve_ilp(table, budget_bits)
    return dict(found.assignment), float(found.objective), float(found.bits_per_param)


def export_gguf(
    merged: Path,
    fisher_twin: Path,
    out: Path,
    allowed: tuple[GGMLType, ...],
    other: str,
    bits: float | None,
    max_bytes: int | None,
    scratch: Path,
    log: Callable[[str], None] = print,
    progress: Callable[[str, int, int], None] = lambda what, done, total: None,
) -> tuple[GGUFPlan, list[Written]]:
    with tempfile.TemporaryDirectory(dir=scratch, prefix="gguf-") as tmp:
        tmp = Path(tmp)
        notes = convert(merged, tmp / "model-f32.gguf", log=log)
        convert(fisher_twin, tmp / "fisher-f32.gguf", log=lambda line: None)
        weights, fisher = GGUFReader(tmp / "model-f32.gguf"), GGUFReader(tmp / "fisher-f32.gguf")
        targets = set(marked_targets(fisher))
        other_kind = ggml_type(other)
        numel = sum(int(t.n_elements) for t in weights.tensors if t.name in targets)
        budget = target_budget(bits, max_bytes, non_target_bytes(weights, targets, other_kind), numel)
        log(f"gguf: pricing {len(allowed)} llama.cpp types on {len(targets)} target matrices")
        table = type_table(weights, fisher, allowed, lambda d, t: progress("gguf error table", d, t))
        picks, objective, achieved = plan_types(table, budget)
        log(f"gguf: plan at {achieved:.3f} bits per target weight, Fisher-weighted error {objective:.4g}")
        written = write_mixed(weights, fisher, out, {n: ggml_type(t) for n, t in picks.items()}, other_kind,
                              lambda d, t: progress("gguf write", d, t))
        del weights, fisher  # the readers map the scratch files
    return GGUFPlan(picks, objective, achieved, table, notes), written
