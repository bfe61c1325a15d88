"""Confirmation keeps matrices prepared between its rounds (`InputCache`): the rows
computed from a kept input are the rows computed from the tensors, bit for bit, the
kept matrices are read once, and the cache holds no more than its byte limit."""

import pytest
import torch

from lqlora_dagster.decompose.lq import InputCache, LQSettings, prepare
from lqlora_dagster.error_estimation.compute import RowRequest, compute_rows
from lqlora_dagster.error_estimation.table_ref import TableRef
from lqlora_dagster.models.targets import Target
from lqlora_dagster.quant.config import CONFIG_GRID

CONFIGS = tuple(c.name for c in list(CONFIG_GRID)[::40])
SETTINGS = LQSettings(rank=4, max_iters=6)
SHAPE = (48, 64)


def matrices() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return {f"m{i}": (torch.randn(*SHAPE, generator=g), torch.rand(*SHAPE, generator=g) + 0.1) for i in range(3)}


def two_rounds(method: str, rank: int, inputs: InputCache | None) -> tuple[list[dict], list[str]]:
    """Rows of two rounds asking for other configs of the same matrices, as confirmation
    does, and the names of the matrices read."""
    mats, read = matrices(), []
    ref = TableRef(method, "t", rank, "f", list(CONFIGS), 0)
    rounds = []
    for configs in (CONFIGS[:2], CONFIGS[2:]):
        got: dict = {}
        requests = [RowRequest(ref, Target(name, *SHAPE, 0, "q_proj", False), configs, "t") for name in mats]

        def weight_of(t: Target) -> torch.Tensor:
            read.append(t.name)
            return mats[t.name][0]

        def commit(request, results, got=got):
            got.update({(request.target.name, r.config.name): r.error for r in results})

        compute_rows(requests, SETTINGS, weight_of, lambda r: mats[r.target.name][1], commit, 2, inputs=inputs)
        rounds.append(got)
    return rounds, read


@pytest.mark.parametrize(("method", "rank"), [("lqlora-fisher", 4), ("lqlora", 4), ("loftq", 4), ("qlora", 4),
                                              ("lqlora-fisher", 0)])
def test_kept_inputs_give_the_same_rows_and_are_read_once(method, rank):
    fresh, read_fresh = two_rounds(method, rank, None)
    kept, read_kept = two_rounds(method, rank, InputCache(2**20))
    assert kept == fresh  # exact equality: the same bits
    assert len(read_fresh) == 6 and sorted(read_kept) == ["m0", "m1", "m2"]


def test_the_least_recently_used_input_goes_first_and_big_ones_are_not_kept():
    W = torch.randn(*SHAPE)
    one = W.numel() * 4  # bytes of a matrix without a Fisher diagonal
    cache, made = InputCache(2 * one), []

    def make(name):
        made.append(name)
        return prepare(W)

    for name in ["a", "b", "a", "c", "a", "b"]:  # c evicts b (a was used last), b evicts c
        cache.get(name, lambda name=name: make(name))
    assert made == ["a", "b", "c", "b"]
    assert cache.get("big", lambda: prepare(torch.randn(100, 100))) is not None
    assert "big" not in cache._held and cache._bytes <= 2 * one
