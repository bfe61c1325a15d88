"""Many matrices at once, each on one torch thread.

An LQ decomposition's result depends on torch's CPU thread count: the thread count
changes the order of BLAS sums, and the alternating iteration amplifies last-bit
differences to about 1% of the error. Running every decomposition on one thread, with
the parallelism across matrices, makes a matrix's result the same in every stage that
computes it (table chunks, plan confirmation, the decomposition stage) and on every
CPU, whatever its core count. It is also faster: these matrices are too small for
intra-op threads to pay off (bench/bench_matrix_threads.py, bench/results/). Python
threads are enough, because torch releases the GIL inside its kernels.

A GPU's kernels sum in their own order, so a table built there differs from a CPU's at
the same rounding level (bench/results/gpu_h200.md); whether stages on one GPU agree
bit for bit has not been measured.
"""

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def matrix_workers(device: torch.device, cpu_workers: int = 0) -> int:
    """Matrices to decompose at a time: `cpu_workers` on CPU (0: one per core), one on a
    GPU (its kernels are parallel already, and its arithmetic ignores CPU threads)."""
    if device.type == "cuda":
        return 1
    return cpu_workers if cpu_workers > 0 else available_cores()


def one_thread_per_matrix(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[tuple[T, R]]:
    """Yield (item, fn(item)) as each finishes, `workers` at a time, torch on one thread.

    The caller's loop body (committing results, logging) runs in the caller's thread, so
    it needs no locks. The first error is raised after the running calls finish; calls
    not yet started are dropped. torch's thread count is restored when the loop ends."""
    items = list(items)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if workers <= 1 or len(items) <= 1:
            for item in items:
                yield item, fn(item)
            return
        with ThreadPoolExecutor(min(workers, len(items)), thread_name_prefix="lq-matrix") as pool:
            futures = {pool.submit(fn, item): item for item in items}
            try:
                for done in as_completed(futures):
                    yield futures[done], done.result()
            finally:
                for future in futures:
                    future.cancel()
    finally:
        torch.set_num_threads(previous)
