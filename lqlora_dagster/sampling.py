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

    def next_token(self, logits) -> int:
        """The token drawn from next-token `logits` (vocab,), as transformers' warpers do
        it (temperature, then top-p) with the same random draw, so our runtime and
        transformers' `generate` continue a seeded prompt alike."""
        import torch  # here: the CLI checks --temperature without loading torch

        if self.greedy:
            return int(logits.argmax())
        scores = logits.float() / self.temperature
        if self.top_p < 1:
            ordered, order = scores.sort(descending=False)
            outside = ordered.softmax(-1).cumsum(-1) <= 1 - self.top_p
            outside[-1:] = False  # the likeliest token always stays
            scores = scores.masked_fill(outside.scatter(0, order, outside), float("-inf"))
        return int(torch.multinomial(scores.softmax(-1), 1))
