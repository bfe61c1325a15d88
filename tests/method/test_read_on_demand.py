"""The error table's chunk steps read each matrix when a worker starts on it and drop it
after its last use, instead of holding all of a chunk's matrices from the start."""

import threading

import torch

from lqlora_dagster.pipeline.error_table_stage import _ReadOnDemand


def test_each_tensor_is_read_once_and_held_only_until_its_last_use():
    reads = []

    def read(key):
        reads.append(key)
        return torch.full((2,), float(len(reads)))

    lazy = _ReadOnDemand(read, {"a": 2, "b": 1})
    assert reads == []  # nothing read up front
    first = lazy.get("a")
    assert reads == ["a"] and "a" in lazy._held  # a second request for it is pending
    assert lazy.get("a") is first and reads == ["a"]  # not read again
    assert "a" not in lazy._held  # its last use: no longer held
    lazy.get("b")
    assert reads == ["a", "b"] and not lazy._held


def test_concurrent_requests_read_a_shared_tensor_once():
    reads = []
    lazy = _ReadOnDemand(lambda key: reads.append(key) or torch.zeros(1), {"w": 8})
    threads = [threading.Thread(target=lazy.get, args=("w",)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reads == ["w"] and not lazy._held
