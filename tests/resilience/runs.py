"""A pipeline run in its own process group (crash_driver.py), watched line by line,
for the tests that kill runs or run them side by side."""

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from lqlora_dagster.pipeline.registry import register_model
from lqlora_dagster.store.warehouse import Warehouse
from tests.resilience.crash_driver import PAUSE_AFTER_STEP

REPO = Path(__file__).resolve().parents[2]
MODEL = "tiny"


class Run:
    """One driver process; its stderr lines are collected with arrival times."""

    def __init__(self, home: Path, last_asset: str, run_config: dict, partition: str = MODEL,
                 pause_after_step: int | None = None):
        env = dict(os.environ, LQLORA_HOME=str(home), DAGSTER_HOME=str(home / "dagster"), PYTHONUNBUFFERED="1")
        env.pop(PAUSE_AFTER_STEP, None)
        if pause_after_step is not None:
            env[PAUSE_AFTER_STEP] = str(pause_after_step)  # crash_driver.py stops there
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.resilience.crash_driver", str(home), partition, last_asset, json.dumps(run_config)],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.lines: list[tuple[float, str]] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stderr:
            self._queue.put((time.monotonic(), line.rstrip("\n")))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                item = self._queue.get(timeout=1)
            except queue.Empty:
                continue
            if item is None:
                break
            self.lines.append(item)
            if re.search(pattern, item[1]):
                return
        self.kill()
        tail = "\n".join(line for _, line in self.lines[-30:])
        raise AssertionError(f"never saw {pattern!r} (exit {self.proc.poll()}); log tail:\n{tail}")

    def kill(self) -> float:
        """SIGKILL the whole process group; returns when it happened."""
        at = time.monotonic()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        self._drain()
        return at

    def orphans(self, grace: float = 10) -> list[int]:
        """Processes of the run's group still alive `grace` seconds after a kill (zombies,
        which only wait to be reaped, do not count)."""
        deadline = time.monotonic() + grace
        while (left := group_members(self.proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left

    def finish(self, timeout: float = 600) -> int:
        code = self.proc.wait(timeout=timeout)
        self._drain()
        return code

    def _drain(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=5)
            except queue.Empty:
                return
            if item is None:
                return
            self.lines.append(item)

    def matching(self, pattern: str) -> list[tuple[float, str]]:
        return [(t, line) for t, line in self.lines if re.search(pattern, line)]

    def log_tail(self) -> str:
        return "\n".join(line for _, line in self.lines[-40:])


def new_home(tmp_path: Path, name: str, model_folder: Path) -> Path:
    home = tmp_path / name
    w = Warehouse(home / "lqlora.duckdb")
    w.init_schema()
    register_model(w, MODEL, str(model_folder))
    return home


def group_members(pgid: int) -> list[int]:
    """Live processes whose process group is `pgid` (from /proc)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError):
            continue
        if int(group) == pgid and state != "Z":
            members.append(int(stat.parent.name))
    return members
