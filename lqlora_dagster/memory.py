"""Peak memory of one piece of work, not of the whole process.

The process high-water mark (`ru_maxrss`) only ever grows, so every row measured in one
run reads the same number. `PeakMemory` instead records what the work inside the
`with` block added above what the process held when it started: on CUDA the
allocator's peak over its start; on Linux the kernel's resident-set high-water mark
(`VmHWM`), reset to the current size when a block starts (`/proc/self/clear_refs`), so
the peak is exact and costs nothing while the work runs. Where that reset is refused,
a thread samples the resident set size every couple of milliseconds instead (torch
releases the GIL inside its kernels, so the sampler keeps running during them; it
cost about 2% of a core). Memory-mapped weights count once their pages are touched.
"""

import os
import resource
import sys
import threading
import time

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_STATM = "/proc/self/statm"
_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"
MB = 2**20


def release_freed_memory() -> None:
    """Collect garbage and hand the allocator's free pages back to the OS (glibc's
    malloc_trim), so a measurement that starts next counts what it allocates, not whether
    earlier work happened to leave freed memory behind for it to reuse."""
    import ctypes  # only here: the one caller measures, nothing else needs libc
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def rss_bytes() -> int:
    """Resident set size now; the process peak where /proc is missing (macOS)."""
    try:
        with open(_STATM) as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def _high_water_bytes() -> int | None:
    """The kernel's peak resident set size since the last reset (None without /proc)."""
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_high_water() -> bool:
    """Set the peak resident set size to the current one (Linux 4.0+); False if refused."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _HighWater:
    """The blocks being measured by the high-water mark. Starting one resets the mark,
    which would lose the peak the open (enclosing or concurrent) blocks have seen so
    far: it is folded into each of them first."""

    lock = threading.Lock()
    blocks: set["PeakMemory"] = set()

    @classmethod
    def start(cls, block: "PeakMemory") -> bool:
        with cls.lock:
            mark = _high_water_bytes()
            if mark is None:
                return False
            for other in cls.blocks:
                other.peak = max(other.peak, mark)
            if not _reset_high_water():
                return False
            cls.blocks.add(block)
            return True

    @classmethod
    def end(cls, block: "PeakMemory") -> None:
        with cls.lock:
            cls.blocks.discard(block)
            block.peak = max(block.peak, _high_water_bytes() or 0)


class PeakMemory:
    """`with PeakMemory(device) as mem: ...`, then `mem.added_mb` (peak minus start) and
    `mem.peak_mb` (peak in absolute terms)."""

    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.002):
        self.device = torch.device(device)
        self.interval_s = interval_s  # the sampler's, where the high-water mark cannot be reset
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._high_water = False

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = self.peak = torch.cuda.memory_allocated(self.device)
        else:
            self.start = self.peak = rss_bytes()
            self._high_water = _HighWater.start(self)
            if not self._high_water:
                self._thread = threading.Thread(target=self._sample, name="peak-memory", daemon=True)
                self._thread.start()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._started
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
            return
        if self._high_water:
            _HighWater.end(self)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def added_mb(self) -> float:
        return max(0, self.peak - self.start) / MB

    @property
    def peak_mb(self) -> float:
        return self.peak / MB
