"""A run's terminal and its log file: while the run goes on, everything printed by this
process and the step processes it starts (Dagster's event log, library output) goes
to `LQLORA_HOME/logs/<time>-<what>.log`; the terminal shows the `RunDisplay` summary,
and with `verbose` the full log as well."""

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lqlora_dagster.run_display import RunDisplay, RunEvent


def _tee(read_fd: int, log, term_fd: int) -> None:
    while chunk := os.read(read_fd, 65536):
        log.write(chunk)
        log.flush()
        os.write(term_fd, chunk)
    os.close(read_fd)


@contextmanager
def _output_to(path: Path, term_fd: int, verbose: bool) -> Iterator[None]:
    """File descriptors 1 and 2 (inherited by child processes) write to `path`, and
    through a pipe to the terminal as well when `verbose`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log = open(path, "ab")
    pump = None
    if verbose:
        read_fd, write_fd = os.pipe()
        pump = threading.Thread(target=_tee, args=(read_fd, log, term_fd), daemon=True)
        pump.start()
        target = write_fd
    else:
        target = log.fileno()
    os.dup2(target, 1)
    os.dup2(target, 2)
    if verbose:
        os.close(write_fd)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        if pump is not None:
            pump.join(timeout=10)  # step processes may keep the pipe open a moment longer
        log.close()


def run_with_log(
    home: Path,
    name: str,
    run: Callable[[Callable[[RunEvent], None]], bool],
    header: str,
    verbose: bool = False,
) -> bool:
    """Call `run(show)` with the output captured; returns whether it succeeded. A failed
    run prints the failed stage, its error and where the full log is."""
    path = Path(home) / "logs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    term = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1)
    try:
        display = RunDisplay(term, tty=term.isatty())
        print(header, file=term)
        print(f"full log: {path}", file=term)
        with _output_to(path, term.fileno(), verbose):
            try:
                ok = run(display.show)
            finally:
                display.close()
        if not ok:
            where = "; ".join(f"{stage}: {error}" for stage, error in display.failed) or "see the log"
            print(f"the run failed ({where})", file=term)
            print(f"full log: {path}; the run also shows in the Dagster UI (lqlora ui)", file=term)
        return ok
    finally:
        term.close()
