"""The values passed between pipeline stages: small, JSON-able, carrying content keys.

Heavy payloads (tensors, tables) live in the artifact store and the warehouse under
these keys; a handle says exactly which stored result a downstream stage must read,
so lineage never depends on "the newest file".
"""

import dataclasses
import json
from dataclasses import dataclass, field

from lqlora_dagster.data.selection import TaskData
from lqlora_dagster.decompose.lq import LQSettings
from lqlora_dagster.error_estimation.table_ref import TableRef
from lqlora_dagster.knobs import from_values


@dataclass(frozen=True)
class ModelHandle:
    model: str  # partition key
    folder: str  # loadable HF folder
    task: str
    pattern: str | None
    key: str  # weights checksum + target pattern
    n_targets: int
    target_params: int


@dataclass(frozen=True)
class CalibrationHandle:
    model: str
    key: str
    n_sequences: int
    seq_len: int
    labels: tuple[str, ...] = ()  # classifier: the head's labels (Fisher sizes the head to them)


@dataclass(frozen=True)
class FisherHandle:
    model: str
    key: str
    n_matrices: int


@dataclass(frozen=True)
class ErrorTableHandle:
    model: str
    model_key: str
    lq: LQSettings  # the decomposition the rows price (and the decomposition stage runs)
    tables: list[TableRef] = field(default_factory=list)


@dataclass(frozen=True)
class PlanRef:
    plan_id: str
    method: str
    budget: float  # in the unit of its kind: bits/param, or bytes for "total"
    bits_per_param: float  # of the quantized part, achieved
    objective: float
    table_key: str  # the table of its highest rank
    budget_kind: str = "quantized"
    ranks: tuple[int, ...] = ()  # the ranks it chose from (empty: the run's one rank)


@dataclass(frozen=True)
class PlanHandle:
    model: str
    plans: list[PlanRef]
    lq: LQSettings


@dataclass(frozen=True)
class DecompositionRef:
    plan_id: str
    method: str
    budget: float
    decomp_key: str
    bits_per_param: float
    bits_incl_lowrank: float
    rank: int = 0  # of the factors (the reference LoRA trains at the same rank)


@dataclass(frozen=True)
class DecomposedHandle:
    model: str
    items: list[DecompositionRef]


@dataclass(frozen=True)
class AdapterRef:
    plan_id: str  # "reference" for the uncompressed model's LoRA
    method: str
    budget: float | None  # None for the reference
    decomp_key: str  # the reference: the base model's key
    run_key: str
    final_loss: float = float("nan")
    best_step: int | None = None  # the step whose adapter was kept (lowest validation loss)
    best_val_loss: float | None = None
    rank: int = 0  # of the factors
    lr: float | None = None  # the peak learning rate of the run kept


@dataclass(frozen=True)
class FinetunedHandle:
    model: str
    items: list[AdapterRef]


@dataclass(frozen=True)
class EvaluationHandle:
    model: str
    eval_keys: list[str]


@dataclass(frozen=True)
class ExportHandle:
    model: str
    export_key: str  # DuckDB exports, export_tensors; the artifact under exported_model/<model>/<key>
    format: str
    path: str  # the file (gguf) or folder (hf, peft) in the store
    file_bytes: int
    method: str
    budget: float | None
    exported_ppl: float | None = None  # in the file's runtime, when checked
    in_tool_ppl: float | None = None  # the finetuned model in lqlora, same windows
    margin: float = 0.05  # how far above in_tool_ppl the file may score before the check warns


@dataclass(frozen=True)
class ReportHandle:
    model: str
    key: str  # the stored report folder: comparison.md, pareto.png, allocation.png
    files: list[str]
    heatmap_plan: str | None  # plan_id drawn in allocation.png


HANDLE_TYPES = {
    cls.__name__: cls
    for cls in (
        ModelHandle,
        CalibrationHandle,
        FisherHandle,
        ErrorTableHandle,
        PlanHandle,
        DecomposedHandle,
        FinetunedHandle,
        EvaluationHandle,
        ReportHandle,
        ExportHandle,
        TaskData,
    )
}


def to_json(handle) -> str:
    return json.dumps({"type": type(handle).__name__, "value": dataclasses.asdict(handle)}, indent=1)


def from_json(text: str):
    data = json.loads(text)
    return from_values(HANDLE_TYPES[data["type"]], data["value"])
