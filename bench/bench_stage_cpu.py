"""Wall and CPU time of every stage of `lqlora run`, for any checkout of this repository.

    python -m bench.bench_stage_cpu --home /tmp/newhome [--checkout PATH] [-- extra `lqlora run` flags]
    python -m bench.bench_stage_cpu --smoke     # the whole graph on a tiny Llama, every stage at its smallest

Runs `python -m lqlora_dagster.cli run` from `--checkout` (default: this one) with
LQLORA_HOME=--home, and meanwhile samples, twice a second, the CPU time of every process
the run starts (/proc: user + system, its own and its reaped children's). Dagster runs
each step in a process of its own and logs that process's id with STEP_START, so the
run's log file says which process was which step: a step's CPU time is the last sample
of its process (at most half a second is missed at its end). A stage's wall time runs
from its first step's start to its last step's end (the error table fans out over
chunk steps). The same script measures older commits, which know nothing about it:
that is what makes the side-by-side comparison fair. A step shorter than the sampling
period may end unsampled (0 s). Linux only (/proc).
"""

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

from bench._common import REPO, add_smoke, save_tiny_llama, stamp

TICK = os.sysconf("SC_CLK_TCK")
STEP_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \S+ - dagster - \w+ - \S+ - [0-9a-f-]+ - (\d+) - (\S+) - ([A-Z_]+) - "
)


def _cpu_and_parent(pid: int) -> tuple[float, int] | None:
    """(utime + stime + cutime + cstime in seconds, parent pid) of a live process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    ppid = int(fields[1])
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return (utime + stime + cutime + cstime) / TICK, ppid


class TreeSampler(threading.Thread):
    """Last-seen CPU seconds of every process descended from `root`."""

    def __init__(self, root: int, period: float = 0.5):
        super().__init__(daemon=True)
        self.root, self.period = root, period
        self.cpu: dict[int, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.sample()
            self.done.wait(self.period)

    def sample(self) -> None:
        stats = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (got := _cpu_and_parent(int(entry))) is not None:
                stats[int(entry)] = got
        tree = {self.root}
        grew = True
        while grew:  # every descendant of the root
            new = {pid for pid, (_, ppid) in stats.items() if ppid in tree and pid not in tree}
            tree |= new
            grew = bool(new)
        for pid in tree & stats.keys():
            self.cpu[pid] = stats[pid][0]


def step_times(log: Path) -> dict[str, dict]:
    """{step: {pid, start, end}} from a run's log file. A step's end is its STEP_SUCCESS, or
    its last event when the file lacks that line (the run's log can miss a step's final event)."""
    steps: dict[str, dict] = {}
    for line in log.read_text(errors="replace").splitlines():
        m = STEP_LINE.match(line)
        if not m:
            continue
        at, pid, step, event = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"), int(m.group(2)), m.group(3), m.group(4)
        if event == "STEP_START":
            steps.setdefault(step, {})["pid"] = pid
            steps[step]["start"] = at
        elif step in steps and event in ("STEP_SUCCESS", "STEP_OUTPUT", "HANDLED_OUTPUT", "ASSET_MATERIALIZATION"):
            steps[step]["end"] = max(steps[step].get("end", at), at)
    return steps


def stage_of(step: str) -> str:
    """error_table.error_table_chunk_3 -> error_table; checks (asset_check) keep their asset's stage."""
    return step.split(".")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, help="LQLORA_HOME for the run (fresh: every stage computes)")
    parser.add_argument("--checkout", type=Path, default=REPO, help="the code to run (a git worktree of any commit)")
    parser.add_argument("--label", default="", help="what to call this code in the printed table")
    parser.add_argument("extra", nargs="*", help="more `lqlora run` flags, after --")
    add_smoke(parser)
    args = parser.parse_args()
    print(stamp())
    if args.smoke:
        from bench.bench_full_graph import SMOKE_MODEL, SMOKE_RUN
        from lqlora_dagster.cli import main as lqlora

        with tempfile.TemporaryDirectory() as tmp:
            args.home = Path(tmp)
            os.environ["LQLORA_HOME"] = tmp
            if lqlora(["register", str(save_tiny_llama(args.home / "tiny")), "--name", SMOKE_MODEL]):
                sys.exit("could not register the tiny model")
            # every step in a process of its own, as a real run: that is what is measured
            args.extra = ["--model", SMOKE_MODEL, *(f for f in SMOKE_RUN if f != "--in-process"), *args.extra]
            measure(args)
        return
    if args.home is None:
        parser.error("--home is required")
    measure(args)


def measure(args) -> None:
    checkout = args.checkout.resolve()
    commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"- measured code: {checkout} at {commit}; LQLORA_HOME={args.home}")
    env = dict(os.environ, LQLORA_HOME=str(args.home), PYTHONPATH=str(checkout))
    logs = args.home / "logs"
    before = set(logs.glob("*-run-*.log")) if logs.exists() else set()
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "lqlora_dagster.cli", "run", *args.extra], cwd=checkout, env=env)
    sampler = TreeSampler(child.pid)
    sampler.start()
    rc = child.wait()
    wall = time.perf_counter() - started
    sampler.done.set()
    sampler.join()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the whole run, by the kernel's own account
    total_cpu = children.ru_utime + children.ru_stime
    new_logs = sorted(set(logs.glob("*-run-*.log")) - before)
    if rc != 0 or not new_logs:
        sys.exit(f"the run failed (exit {rc}) or wrote no log under {logs}")
    steps = step_times(new_logs[-1])
    stages: dict[str, dict] = {}
    for step, t in steps.items():
        stage = stages.setdefault(stage_of(step), {"start": t.get("start"), "end": t.get("end"), "cpu": 0.0, "steps": 0})
        stage["start"] = min(stage["start"], t["start"]) if t.get("start") else stage["start"]
        stage["end"] = max(stage["end"], t["end"]) if t.get("end") and stage["end"] else t.get("end") or stage["end"]
        stage["cpu"] += sampler.cpu.get(t["pid"], 0.0)
        stage["steps"] += 1
    label = args.label or commit
    print(f"\n| stage ({label}) | steps | wall s | CPU s |\n|---|---|---|---|")
    for name, s in sorted(stages.items(), key=lambda kv: kv[1]["start"]):
        span = (s["end"] - s["start"]).total_seconds() if s["start"] and s["end"] else float("nan")
        print(f"| {name} | {s['steps']} | {span:.0f} | {s['cpu']:.1f} |")
    print(f"| whole run (`lqlora run`, launch and display included) | | {wall:.0f} | {total_cpu:.1f} |")


if __name__ == "__main__":
    main()
