"""The settings of each stage, one frozen dataclass per configurable asset, and
`PipelineSettings`, which holds one of each under the asset's name.

Every field is a knob (`knobs.py`): its help, default and bounds are written here (or
in the method's own settings, `LQSettings` and `TrainSettings`, which the stages
extend), and the launchpad, the CLI flags and the run configs are derived from them.
Defaults are sized for SmolLM2-135M on a 2-core CPU.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

from lqlora_dagster.allocate.budget import Budget, parse_size
from lqlora_dagster.decompose.lq import LQSettings
from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.export.ggml_types import BY_NAME as GGML_TYPES
from lqlora_dagster.export.ggml_types import CANDIDATES as GGML_CANDIDATES
from lqlora_dagster.knobs import check_knobs, from_values, knob, knob_values
from lqlora_dagster.methods import METHODS, Method
from lqlora_dagster.quant.config import CONFIG_GRID, REDUCED_GRID, QuantConfig
from lqlora_dagster.training.finetune import TrainSettings

GRIDS: dict[str, tuple[QuantConfig, ...]] = {"full": CONFIG_GRID, "reduced": REDUCED_GRID}


@dataclass(frozen=True)
class DataSettings:
    """Which registered datasets (`lqlora data add`) the run reads, and the held-out splits."""

    cli_prefix: ClassVar[str] = "data-"

    train: str = knob(
        "", "training dataset; empty: the model's bundled data (the speeches, or polarity for a classifier)",
        flags=("--train",),
    )
    eval: str = knob("", "held-out dataset to score; empty: `test_fraction` of the training data", flags=("--eval",))
    val: str = knob("", "validation dataset; empty: `val_fraction` of the training data", flags=("--val",))
    calibration: str = knob("", "calibration dataset for the Fisher weights; empty: the training data",
                            flags=("--calibration",))
    val_fraction: float = knob(0.1, "share of the training data held out for validation", gt=0, lt=0.5)
    test_fraction: float = knob(0.1, "share of the training data held out for evaluation when no --eval is given",
                                gt=0, lt=0.5)
    split_seed: int = knob(0, "seed of the row shuffle that makes the held-out splits")

    def __post_init__(self) -> None:
        check_knobs(self)


@dataclass(frozen=True)
class CalibrationSettings:
    cli_prefix: ClassVar[str] = "calibration-"

    n_sequences: int = knob(32, "calibration sequences (one backward pass each)", ge=1, flags=("--calibration-sequences",))
    seq_len: int = knob(256, "tokens per calibration sequence", ge=2, flags=("--calibration-len",))
    seed: int = knob(0, "seed of the choice of calibration windows")

    def __post_init__(self) -> None:
        check_knobs(self)


@dataclass(frozen=True)
class ErrorTableSettings(LQSettings):
    """The LQ knobs (rank, SVD, stopping rule) plus which tables to compute and how."""

    cli_prefix: ClassVar[str] = ""

    methods: tuple[str, ...] = knob(
        ("lqlora-fisher",), "methods to plan for (one error table per init)", choices=tuple(METHODS), nonempty=True
    )
    grid: str = knob("full", "candidate configs: full (the paper's 432) or reduced (24, quick looks)", choices=tuple(GRIDS))
    fast: bool = knob(
        True,
        "estimate most rows from shared decompositions (plans are then confirmed with exact rows)",
        flags=("--exhaustive",),
        off="decompose every matrix once per config (exact rows throughout; far slower)",
    )
    refine_steps: int = knob(
        2, "fast path: own alternating steps for configs with coarse block-scale codes (0: none)", ge=0
    )
    refine_max_b0: int = knob(3, "fast path: block-scale codes of at most this many bits count as coarse", ge=0)
    ranks: tuple[int, ...] = knob(
        (),
        "ranks the ILP picks from per matrix, with the bits (0: no low-rank part); empty: the one `rank` "
        "for every matrix",
        ge=0,
    )
    threads_per_chunk: int = knob(
        1, "matrices each of the table's parallel steps computes at a time, one torch thread each (0: one per core)", ge=0
    )

    @property
    def configs(self) -> tuple[QuantConfig, ...]:
        return GRIDS[self.grid]

    def lq(self) -> LQSettings:
        """The decomposition's own knobs (what the table rows depend on)."""
        return LQSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LQSettings)})

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(set(self.ranks)) != len(self.ranks):
            raise LQLoRAInputError(f"ranks lists a rank twice: {list(self.ranks)}")

    def ranks_for(self, method: Method) -> tuple[int, ...]:
        """The ranks a method's table is computed at: the `ranks` list for a method that
        allocates rank (low-rank init, ILP), else the one `rank` (0 without a low-rank init)."""
        if not method.has_lowrank_init:
            return (0,)
        return tuple(sorted(self.ranks)) if self.ranks and method.ilp else (self.rank,)


@dataclass(frozen=True)
class PlanSettings:
    cli_prefix: ClassVar[str] = ""

    budgets: tuple[float, ...] = knob(
        (3.25,), "target bits per parameter (see budget_kind); one plan per budget", flags=("--budget",)
    )
    budget_kind: str = knob(
        "quantized",
        "what `budgets` count: quantized (the packed matrices, the paper's) or lowrank (also the factors)",
        choices=("quantized", "lowrank"),
    )
    max_sizes: tuple[str, ...] = knob(
        (),
        "total-size budgets for the whole saved model, non-target tensors included (e.g. 80MB); one plan each",
        flags=("--max-size",),
    )
    factor_bits: int = knob(16, "bits per entry of L1, L2 wherever a budget counts them (16: bf16/fp16)", ge=1, le=32)
    fixed_rank_plans: bool = knob(
        False, "with several `ranks`: also plan at each nonzero rank alone (the fixed-rank baselines)"
    )
    budgets_by_method: dict[str, tuple[float, ...]] = knob(
        {}, "budgets for particular methods instead of `budgets` (e.g. qlora: [3.15, 4.15] for NF3, NF4)", flags=()
    )
    confirm: bool = knob(
        True,
        "on a fast table, compute the exact error of every config a plan picks and re-solve until all "
        "its picks are exact (the plan's objective is then the realized error)",
        flags=("--no-confirm",),
        off="take each fast-table plan as solved on its estimates, without computing exact rows for its picks",
    )
    confirm_margin: float = knob(
        0.08,
        "confirmation: estimates not yet exact count as this fraction lower (higher: closer to the "
        "exhaustive plan, more exact rows to compute)",
        ge=0,
        lt=1,
    )

    other_rank_margin: float = knob(
        0.35,
        "confirmation: the margin of rows at ranks above the base rank (`ranks`), priced one step up from its "
        "factors, whose estimates run high",
        ge=0,
        lt=1,
    )
    lower_rank_margin: float = knob(
        0.1,
        "confirmation: the margin of rows at ranks below the base rank, its factors truncated, whose estimates "
        "run high: a wider margin makes nearly every such pick look better than it is, round after round",
        ge=0,
        lt=1,
    )

    def __post_init__(self) -> None:
        for b in self.budgets + tuple(b for bs in dict(self.budgets_by_method).values() for b in bs):
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not (0 < b < 64) or not math.isfinite(b):
                raise LQLoRAInputError(f"budget {b!r} is not a sensible number of bits per parameter (0 < b < 64)")
        check_knobs(self)
        if not self.budgets and not self.max_sizes:
            raise LQLoRAInputError("give at least one budget (--budget) or total size (--max-size)")
        for size in self.max_sizes:
            parse_size(size)
        for method, budgets in self.budgets_by_method.items():
            if method not in METHODS:
                raise LQLoRAInputError(
                    f"budgets_by_method names unknown method {method!r}; choose from {', '.join(METHODS)}"
                )
            if not budgets:
                raise LQLoRAInputError(f"budgets_by_method gives no budget for {method!r}")

    @property
    def margin(self) -> float | None:
        """The confirmation margin, or None when plans are not confirmed."""
        return self.confirm_margin if self.confirm else None

    def budgets_for(self, method: str) -> tuple[Budget, ...]:
        bits = self.budgets_by_method.get(method, self.budgets)
        return tuple(Budget(self.budget_kind, float(b)) for b in bits) + tuple(
            Budget("total", float(parse_size(s))) for s in self.max_sizes
        )


@dataclass(frozen=True)
class FinetuneSettings(TrainSettings):
    """The training loop's knobs plus the data windows and which plans to train."""

    cli_prefix: ClassVar[str] = "finetune-"

    seq_len: int = knob(256, "tokens per training window or example (longer rows are cut)", ge=2,
                        flags=("--finetune-len",))
    reference: bool = knob(
        True, "also finetune the uncompressed model with the same LoRA recipe (the fair upper line)",
        flags=("--no-reference",),
        off="finetune only the compressed models, not the uncompressed reference",
    )
    val_examples: int = knob(32, "validation examples scored each `eval_every` steps (spread over the split)", ge=1)
    lr_grid: tuple[float, ...] = knob(
        (), "learning rates to try for every adapter; each keeps the one with the lowest validation loss "
        "(the test part is never looked at); empty: just `lr`", gt=0, lt=1, flags=("--lr-grid",),
    )
    methods: tuple[str, ...] = knob((), "finetune only these methods (empty: all)", choices=tuple(METHODS))
    budgets: tuple[float, ...] = knob((), "finetune only these budgets (empty: all)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(set(self.lr_grid)) != len(self.lr_grid):
            raise LQLoRAInputError(f"lr_grid lists a learning rate twice: {list(self.lr_grid)}")
        if self.lr_grid and not self.eval_every:
            raise LQLoRAInputError("lr_grid picks by validation loss, so it needs eval_every > 0")

    def learning_rates(self) -> tuple[float, ...]:
        return self.lr_grid or (self.lr,)

    def recipe(self, lr: float) -> dict:
        """What an adapter trained at `lr` depends on among these knobs (not which plans
        are trained, nor the other rates tried)."""
        values = dataclasses.asdict(dataclasses.replace(self, lr=lr, lr_grid=()))
        del values["lr_grid"]
        return values | {"methods": None, "budgets": None}

    def selects(self, method: str, budget: float) -> bool:
        return (not self.methods or method in self.methods) and (
            not self.budgets or any(abs(budget - b) < 1e-9 for b in self.budgets)
        )


@dataclass(frozen=True)
class EvalSettings:
    cli_prefix: ClassVar[str] = "eval-"

    seq_len: int = knob(512, "tokens per perplexity window or example (longer rows are cut)", ge=2, flags=("--eval-len",))
    n_windows: int = knob(16, "perplexity windows scored, spread evenly over the held-out text (rows of other tasks: all)", ge=1,
                          flags=("--eval-windows",))
    batch_size: int = knob(4, "windows per forward pass", ge=1)

    def __post_init__(self) -> None:
        check_knobs(self)


@dataclass(frozen=True)
class ExportSettings:
    """What `exported_model` writes: which adapter, in which format, at which size. Not in
    `PipelineSettings`: the export runs in its own job, after the main one."""

    cli_prefix: ClassVar[str] = ""

    format: str = knob("gguf", "gguf: one file for llama.cpp; hf: merged weights for transformers/vLLM; "
                       "peft: the dequantized base plus the adapter", choices=("gguf", "hf", "peft"))
    method: str | None = knob(None, "the finetuned method to export (default: the first one trained; "
                              "'reference' is the uncompressed model with its LoRA)")
    budget: float | None = knob(None, "the budget that method trained at, when it trained at several", gt=0)
    bits: float = knob(4.5, "gguf: average bits per weight over the target matrices (the file's other tensors "
                       "are counted apart)", gt=0)
    max_size: str | None = knob(None, "gguf: a size for the whole file (e.g. 90MB) instead of --bits")
    types: tuple[str, ...] = knob(tuple(t.name for t in GGML_CANDIDATES),
                                  "gguf: the llama.cpp types the plan may give a target matrix",
                                  choices=tuple(t.name for t in GGML_CANDIDATES), nonempty=True)
    other_type: str = knob("Q8_0", "gguf: the type of the matrices that are not targets (embeddings, an untied "
                           "output layer); vectors stay F32", choices=tuple(GGML_TYPES))
    dtype: str = knob("fp32", "hf and peft: the dtype of the written weights", choices=("fp32", "bf16", "fp16"))
    check: bool = knob(True, "score the written file in its runtime on the held-out windows (llama.cpp for "
                       "gguf, transformers for hf) and record it beside the in-tool model",
                       flags=("--no-check",), off="write the file without scoring it")
    check_len: int = knob(512, "tokens per window the check scores", ge=2)
    check_windows: int = knob(16, "windows the check scores, spread over the held-out text", ge=1)
    margin: float = knob(0.05, "the asset check warns when the file's perplexity is more than this fraction "
                         "above the in-tool model's", ge=0)

    def __post_init__(self) -> None:
        check_knobs(self)
        if self.max_size is not None:
            parse_size(self.max_size)

    @property
    def max_bytes(self) -> int | None:
        return None if self.max_size is None else parse_size(self.max_size)


@dataclass(frozen=True)
class PipelineSettings:
    """The settings of every configurable asset, under the asset's name."""

    task_data: DataSettings = field(default_factory=DataSettings)
    calibration_batches: CalibrationSettings = field(default_factory=CalibrationSettings)
    error_table: ErrorTableSettings = field(default_factory=ErrorTableSettings)
    allocation_plan: PlanSettings = field(default_factory=PlanSettings)
    finetuned_adapters: FinetuneSettings = field(default_factory=FinetuneSettings)
    evaluation: EvalSettings = field(default_factory=EvalSettings)

    def override(self, **changes: dict) -> "PipelineSettings":
        """A copy with some knobs changed: `override(error_table={"rank": 4})`."""
        unknown = sorted(set(changes) - set(STAGE_SETTINGS))
        if unknown:
            raise LQLoRAInputError(f"no settings for stages {unknown}; stages: {sorted(STAGE_SETTINGS)}")
        updated = {
            stage: from_values(STAGE_SETTINGS[stage], {**knob_values(getattr(self, stage)), **values})
            for stage, values in changes.items()
        }
        return dataclasses.replace(self, **updated)

    def run_config(self) -> dict:
        """The Dagster run config that gives every asset these settings."""
        return {"ops": {stage: {"config": knob_values(getattr(self, stage))} for stage in STAGE_SETTINGS}}


STAGE_SETTINGS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(PipelineSettings)}
