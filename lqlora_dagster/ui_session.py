"""`lqlora ui`: `dagster dev` on this project in a session of its own, stopped with
everything it started on Ctrl-C or SIGTERM (a second one kills what is left at once)."""

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


def stop_session(proc, grace_s: float = 20.0, hurry=None) -> None:
    """SIGTERM a process started in its own session and everything in it, then SIGKILL
    what is left (Dagster's `tail -F` log followers ignore SIGTERM) after `grace_s`, or at
    once when `hurry` (a threading.Event) is set; returns once the session's process
    group is empty."""
    for sig, grace in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and not (sig == signal.SIGTERM and hurry is not None and hurry.is_set()):
            proc.poll()  # reap the leader, our child
            try:
                os.killpg(proc.pid, 0)  # anyone left in the group?
            except ProcessLookupError:
                return
            time.sleep(0.3)


def cmd_ui(args: argparse.Namespace, home: Path) -> int:
    """`dagster dev` on this project, with DAGSTER_HOME under LQLORA_HOME. It runs in its
    own session (so its children can be stopped together); Ctrl-C and SIGTERM stop it all,
    and a second one while it stops kills what is left at once."""
    # deferred: help and refused arguments answer before dagster and torch load
    from assets.runs import fail_orphaned_runs, prepare_dagster_home

    prepare_dagster_home(home)
    fail_orphaned_runs()
    repo = Path(__file__).resolve().parents[1]
    cmd = [str(Path(sys.executable).with_name("dagster")), "dev", "-w", str(repo / "workspace.yaml"),
           "-h", args.host, "-p", str(args.port)]
    print(f"Dagster UI on http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    proc = subprocess.Popen(cmd, cwd=repo, env=os.environ.copy(), start_new_session=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        hurry = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: hurry.set())
        print("stopping the Dagster UI (again to kill it at once)", file=sys.stderr, flush=True)
        stop_session(proc, hurry=hurry)
        return 130
