"""Matrices decomposed several at a time, one torch thread each: the result of a matrix
does not depend on how many threads the caller's stage had, and errors surface."""

import time

import pytest
import torch

from lqlora_dagster.decompose.lq import LQSettings, lq_error_estimate
from lqlora_dagster.per_matrix_threads import one_thread_per_matrix
from lqlora_dagster.quant.config import CONFIG_GRID

SETTINGS = LQSettings(rank=8)
CONFIGS = CONFIG_GRID[::48]  # 9 configs, 2 to 8 bits


@pytest.fixture()
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def matrices() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # big enough for 2 threads to split BLAS sums (at 128 x 128 nothing differs)
    return [torch.randn(256, 512, generator=g) * torch.rand(512, generator=g) * 0.05 for _ in range(3)]


def errors(W: torch.Tensor) -> list[float]:
    return [lq_error_estimate(W, c, SETTINGS).error for c in CONFIGS]


def test_results_do_not_depend_on_the_callers_thread_count(restore_threads):
    mats = matrices()
    torch.set_num_threads(2)
    on_two = [errors(W) for W in mats]
    torch.set_num_threads(1)
    on_one = [errors(W) for W in mats]
    assert on_two != on_one  # the hazard is real: the thread count alone moves the errors
    for ambient in (2, 1):
        for workers in (1, 2, 5):
            torch.set_num_threads(ambient)
            got = dict(one_thread_per_matrix(lambda i: errors(mats[i]), range(len(mats)), workers))
            assert [got[i] for i in range(len(mats))] == on_one, (ambient, workers)
            assert torch.get_num_threads() == ambient  # restored for the stage's other work


def test_every_item_is_yielded_once():
    def slow_square(i: int) -> int:
        time.sleep(0.01 * (5 - i))  # later items finish first
        return i * i

    for workers in (1, 3, 10):
        got = list(one_thread_per_matrix(slow_square, range(5), workers))
        assert sorted(got) == [(i, i * i) for i in range(5)]


def test_the_first_error_is_raised_and_calls_not_started_are_dropped(restore_threads):
    torch.set_num_threads(2)
    started = []

    def fail_first(i: int) -> int:
        started.append(i)
        if i == 0:
            raise ValueError("matrix 0 is broken")
        time.sleep(0.2)
        return i

    with pytest.raises(ValueError, match="matrix 0 is broken"):
        list(one_thread_per_matrix(fail_first, range(20), 2))
    assert len(started) < 20
    assert torch.get_num_threads() == 2

