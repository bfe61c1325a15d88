"""How a continuation is drawn, the same for both engines (transformers and llama.cpp):
greedy at temperature 0, else sampled from the top-p nucleus at that temperature, with a
seed so a sampled run can be repeated."""

from dataclasses import dataclass

from lqlora_dagster.errors import LQLoRAInputError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise LQLoRAInputError(f"--temperature must be 0 (greedy) or more, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise LQLoRAInputError(f"--top-p must lie in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
