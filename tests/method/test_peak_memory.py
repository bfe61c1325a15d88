"""`PeakMemory` measures each block's own peak, nested blocks included, with the
kernel's high-water mark or, where resetting it is refused, with its sampler."""

import mmap
import time

from lqlora_dagster import memory
from lqlora_dagster.memory import PeakMemory

MB = 2**20


def touched(mb: int) -> mmap.mmap:
    """`mb` MiB of fresh pages, every one written (resident, not just reserved), handed back
    to the OS on `close`. An anonymous mapping, not a tensor: whether malloc serves a tensor
    from new pages or from freed ones it kept depends on what the process did before (in one
    pytest worker the 40 MB block reused pages and added nothing)."""
    pages = mmap.mmap(-1, mb * MB)
    write_every_page(pages)
    return pages


def write_every_page(pages: mmap.mmap) -> None:
    for offset in range(0, len(pages), mmap.PAGESIZE):
        pages[offset] = 1


def slept(block: PeakMemory, mb: int) -> None:
    """Keep the pages 50 ms: the high-water mark needs no more than its existence."""
    time.sleep(0.05)


def sampled(block: PeakMemory, mb: int, deadline_s: float = 10.0) -> None:
    """Keep the pages until the block's sampler has seen most of it, or the deadline
    passes (then the test fails on the figure): a fixed wait would make the figure depend on
    when the sampler's thread gets a core."""
    end = time.monotonic() + deadline_s
    while block.peak - block.start < 0.8 * mb * MB and time.monotonic() < end:
        time.sleep(0.005)


def nested_peaks(hold=slept) -> tuple[PeakMemory, PeakMemory]:
    with PeakMemory() as outer:
        big = touched(200)
        hold(outer, 200)
        big.close()  # gone before the inner block starts: only the outer block saw it
        with PeakMemory() as inner:
            small = touched(40)
            hold(inner, 40)
            small.close()
    return outer, inner


def test_an_inner_block_does_not_hide_the_outer_blocks_earlier_peak():
    outer, inner = nested_peaks()
    assert outer._high_water and inner._high_water  # Linux lets a process reset its own mark
    assert outer.added_mb >= 190, outer.added_mb
    assert 38 <= inner.added_mb < 120, inner.added_mb


def test_the_sampler_measures_where_the_mark_cannot_be_reset(monkeypatch):
    monkeypatch.setattr(memory, "_reset_high_water", lambda: False)
    outer, inner = nested_peaks(hold=sampled)
    assert not outer._high_water and not inner._high_water
    assert outer.added_mb >= 150, outer.added_mb  # sampled: may miss the last pages of the fill
    assert 20 <= inner.added_mb < 120, inner.added_mb


def test_a_block_that_allocates_nothing_adds_nothing():
    kept = touched(50)
    with PeakMemory() as block:
        write_every_page(kept)  # the same pages again: none new
    assert block.added_mb < 10, block.added_mb
