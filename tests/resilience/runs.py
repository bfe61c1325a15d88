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

REPO = Path(__file__).resolve().parents[2]
MODEL = "tiny"


class Run:
    """One driver process; its stderr lines are collected with arrival times."""

    def __init__(self, home: Path, last_asset: str, run_config: dict, partition: str = MODEL):
        env = dict(os.environ, LQLORA_HOME=str(home), DAGSTER_HOME=str(home / "dagster"), PYTHONUNBUFFERED="1")
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
