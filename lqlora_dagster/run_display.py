"""What `lqlora run` shows while a run goes on: one line when a stage starts and one when
it ends (elapsed, and the summary its asset reported), a progress bar for long stages
(throttled lines when the output is not a terminal), and the failure, if any.

It reads plain `RunEvent`s (made from Dagster's event log by `assets/runs.py`), so it
knows nothing of Dagster; the full event log goes to a file, not here.
"""

import re
import time
from dataclasses import dataclass
from typing import TextIO

from tqdm.auto import tqdm

# progress lines as StageContext.progress writes them: "what: done/total unit (note)"
PROGRESS = re.compile(r"^(?P<what>[^:\n]+): (?P<done>\d+)/(?P<total>\d+) (?P<unit>[\w-]+)(?: \((?P<note>[^)]*)\))?")


@dataclass(frozen=True)
class RunEvent:
    kind: str  # STEP_START, STEP_FAILURE, STEP_STOPPED (interrupted), ASSET_MATERIALIZATION, RUN_SUCCESS, RUN_FAILURE, LOG
    stage: str | None  # the asset a step belongs to
    message: str = ""
    summary: str = ""  # ASSET_MATERIALIZATION: what the asset produced
    error: str = ""  # STEP_FAILURE: the innermost error message


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, s = divmod(seconds, 60)
    return f"{minutes}m{s:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


@dataclass
class _Stage:
    started: float
    bar: tqdm | None = None
    shown_thirds: int = 0
    last: tuple[int, int, str] | None = None
    done: bool = False


class RunDisplay:
    """Feed it events with `show`; it writes a few lines per stage to `out`."""

    def __init__(self, out: TextIO, tty: bool, width: int = 20):
        self.out, self.tty, self.width = out, tty, width
        self.stages: dict[str, _Stage] = {}
        self.failed: list[tuple[str, str]] = []

    def _line(self, stage: str, text: str) -> None:
        line = f"{stage:<{self.width}} {text}"
        if self.tty:
            tqdm.write(line, file=self.out)
        else:
            print(line, file=self.out, flush=True)

    def show(self, event: RunEvent) -> None:
        stage = event.stage
        if stage is None:
            return
        if event.kind == "STEP_START" and stage not in self.stages:
            self.stages[stage] = _Stage(time.monotonic())
            self._line(stage, "started")
        state = self.stages.get(stage)
        if state is None or state.done:
            return
        if event.kind == "LOG":
            self._progress(stage, state, event.message)
        elif event.kind == "ASSET_MATERIALIZATION":
            self._close(state)
            state.done = True
            summary = f": {event.summary}" if event.summary else ""
            self._line(stage, f"done in {clock(time.monotonic() - state.started)}{summary}")
        elif event.kind == "STEP_FAILURE":
            self._close(state)
            state.done = True
            self.failed.append((stage, event.error))
            self._line(stage, f"FAILED after {clock(time.monotonic() - state.started)}: {event.error}")
        elif event.kind == "STEP_STOPPED":
            self._close(state)
            state.done = True
            self._line(stage, f"stopped after {clock(time.monotonic() - state.started)} (interrupted)")

    def _progress(self, stage: str, state: _Stage, message: str) -> None:
        found = PROGRESS.match(message)
        if not found:
            return
        done, total, unit = int(found["done"]), int(found["total"]), found["unit"]
        what = found["what"]
        desc = stage if what == stage else f"{stage} {what}"
        if self.tty:
            if state.bar is None or state.last is None or state.last[1:] != (total, what):
                self._close(state)
                state.bar = tqdm(total=total, desc=f"{desc:<{self.width}}", unit=f" {unit}", file=self.out,
                                 leave=False, dynamic_ncols=True, mininterval=0.5)
            state.bar.n = done
            state.bar.set_postfix_str(found["note"] or "", refresh=False)
            state.bar.refresh()
        else:  # off a terminal: a line at each third, for each run of progress (a plan, an adapter)
            if state.last is not None and state.last[2] != what:
                state.shown_thirds = 0
            thirds = 3 * done // total if total else 0
            if thirds > state.shown_thirds and done < total:
                state.shown_thirds = thirds
                self._line(stage, f"{what}: {done}/{total} {unit}, {clock(time.monotonic() - state.started)}")
        state.last = (done, total, what)

    @staticmethod
    def _close(state: _Stage) -> None:
        if state.bar is not None:
            state.bar.close()
            state.bar = None

    def close(self) -> None:
        for state in self.stages.values():
            self._close(state)
