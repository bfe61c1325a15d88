"""The paper's comparison on one model, as data: which methods run at which budgets,
and what every method shares (rank, calibration, finetuning steps and data, the
evaluation windows), so that rows differ only by method and budget."""

from dataclasses import dataclass

from lqlora_dagster.pipeline.settings import (
    CalibrationSettings,
    ErrorTableSettings,
    EvalSettings,
    FinetuneSettings,
    PlanSettings,
)

# the ILP-capable methods are planned at every budget of the paper's sweep
BUDGETS = (2.5, 2.75, 3.0, 3.25, 3.5, 4.0)
ILP_METHODS = ("qlora-ilp", "lqlora-uniform", "lqlora", "lqlora-fisher")
# QLoRA and LoftQ have one config for every matrix: NF3 costs 3.127 and NF4 4.127
# bits/param (8-bit block scales per 64, fp32 scale per 256), a little more where a
# matrix pads its last group (SmolLM2: 3.128, 4.128); a budget just above each selects
# it, and the row records the bits actually spent
UNIFORM_METHODS = ("qlora", "loftq")
UNIFORM_BUDGETS = (3.15, 4.15)
# a short finetune, identical for every method, at these budgets (and QLoRA NF3/NF4)
FINETUNED_BUDGETS = (2.75, 3.5)
FINETUNED_METHODS = ("qlora", "qlora-ilp", "lqlora-uniform", "lqlora", "lqlora-fisher")
# the heatmap shows where this plan spent its bits
HEATMAP_PLAN = ("lqlora-fisher", 3.0)

LABELS = {
    "reference": "fp32 reference",
    "qlora": "QLoRA",
    "loftq": "LoftQ",
    "qlora-ilp": "QLoRA-ILP",
    "lqlora-uniform": "LQ-LoRA uniform",
    "lqlora": "LQ-LoRA (ILP)",
    "lqlora-fisher": "LQ-LoRA (ILP + Fisher)",
}


@dataclass(frozen=True)
class ComparisonSettings:
    """What all methods share, and which methods run at which budgets. The defaults are
    the language-model comparison; `encoder()` the classifier one."""

    rank: int = 16
    grid: str = "full"  # "reduced" for quick checks (tests)
    calibration_sequences: int = 32
    calibration_len: int = 256
    finetune_steps: int = 10
    finetune_batch: int = 4
    finetune_len: int = 256
    finetune_lr: float = 2e-4
    eval_windows: int = 8
    eval_len: int = 512
    ilp_methods: tuple[str, ...] = ILP_METHODS
    budgets: tuple[float, ...] = BUDGETS
    uniform_methods: tuple[str, ...] = UNIFORM_METHODS
    uniform_budgets: tuple[float, ...] = UNIFORM_BUDGETS  # tiny test models pad more: 3.6, 4.6
    finetuned_methods: tuple[str, ...] = FINETUNED_METHODS
    finetuned_budgets: tuple[float, ...] = FINETUNED_BUDGETS

    @classmethod
    def encoder(cls, **overrides) -> "ComparisonSettings":
        """The paper's GLUE experiment in small: MiniLM on sentence polarity, QLoRA's zero
        init vs LQ-LoRA vs LQ-LoRA-Fisher at 2.5 and 3.0 bits (all ILP-allocated, since
        NF2/NF3 alone cannot meet those budgets), every model finetuned with its head
        for one pass over the 3,200 train sentences (200 steps of 16)."""
        settings = dict(
            calibration_sequences=128,
            calibration_len=64,
            finetune_steps=200,
            finetune_batch=16,
            finetune_len=64,
            finetune_lr=1e-3,
            eval_len=64,
            ilp_methods=("qlora-ilp", "lqlora", "lqlora-fisher"),
            budgets=(2.5, 3.0),
            uniform_methods=(),
            uniform_budgets=(),
            finetuned_methods=("qlora-ilp", "lqlora", "lqlora-fisher"),
            finetuned_budgets=(2.5, 3.0),
        )
        return cls(**{**settings, **overrides})

    def __post_init__(self) -> None:
        """Checked as the stages will check it, before an hour-long run starts."""
        s = self.stage_settings()
        CalibrationSettings(**s["calibration_batches"])
        ErrorTableSettings(**{**s["error_table"], "methods": tuple(s["error_table"]["methods"])})
        PlanSettings(
            tuple(self.budgets), tuple((m, tuple(self.uniform_budgets)) for m in self.uniform_methods)
        )
        finetune = s["finetuned_adapters"]
        FinetuneSettings(
            **{**finetune, "methods": tuple(finetune["methods"]), "budgets": tuple(finetune["budgets"])}
        )
        EvalSettings(**s["evaluation"])

    def stage_settings(self) -> dict[str, dict]:
        """Settings per stage, keyed by asset name (the same knobs as the main job's)."""
        finetune = {
            "steps": self.finetune_steps,
            "batch_size": self.finetune_batch,
            "seq_len": self.finetune_len,
            "methods": list(self.finetuned_methods),
            "budgets": list(tuple(self.finetuned_budgets) + tuple(self.uniform_budgets)),
            "lr": self.finetune_lr,
        }
        return {
            "calibration_batches": {
                "n_sequences": self.calibration_sequences,
                "seq_len": self.calibration_len,
            },
            "error_table": {
                "methods": list(tuple(self.uniform_methods) + tuple(self.ilp_methods)),
                "rank": self.rank,
                "grid": self.grid,
            },
            "allocation_plan": {
                "budgets": list(self.budgets),
                "budgets_by_method": {m: list(self.uniform_budgets) for m in self.uniform_methods},
            },
            "finetuned_adapters": finetune,
            "evaluation": {"n_windows": self.eval_windows, "seq_len": self.eval_len},
        }


def method_label(method: str, budget: float | None, bits: float | None) -> str:
    """'QLoRA NF4' for the uniform baselines, the method's name otherwise."""
    name = LABELS.get(method, method)
    if method in UNIFORM_METHODS and bits is not None:
        name += f" NF{int(bits)}"
    return name
