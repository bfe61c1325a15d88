"""The `lqlora` command as users run it: the installed entry point in a subprocess,
its help, a whole run on a tiny model with progress, and its exit codes."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

LQLORA = str(Path(sys.executable).with_name("lqlora"))
# a run small enough for a test: the tiny Llama, reduced grid, a few windows and steps
TINY_RUN = [
    "--model",
    "tiny",
    "--in-process",
    "--rank",
    "4",
    "--grid",
    "reduced",
    "--calibration-sequences",
    "4",
    "--calibration-len",
    "64",
    "--steps",
    "2",
    "--eval-windows",
    "2",
    "--eval-len",
    "64",
]


def lqlora(home: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [LQLORA, "--home", str(home), *args], capture_output=True, text=True, timeout=timeout
    )


def test_help_lists_every_command():
    out = subprocess.run([LQLORA, "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("register", "run", "data", "generate", "unregister", "sql", "models", "ui"):
        assert command in out.stdout


@pytest.mark.parametrize(
    "command, expected",
    [("register", "--pattern"), ("run", "--budget"), ("sql", "ilp_bits_by_layer"), ("ui", "--port")],
)
def test_each_command_has_help(command, expected):
    out = subprocess.run([LQLORA, command, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and expected in out.stdout


def test_no_command_is_a_usage_error():
    out = subprocess.run([LQLORA], capture_output=True, text=True)
    assert out.returncode == 2 and "required" in out.stderr


@pytest.mark.parametrize(
    "argv, threads",
    [
        (["run", "--in-process"], 0),  # chunks one after another: every core on each
        (["run"], None),  # chunks side by side: the knob's default, one matrix each
        (["run", "--in-process", "--threads-per-chunk", "2"], 2),  # what the user asked wins
        (["compare", "--in-process"], 0),
    ],
)
def test_in_process_runs_spread_each_table_chunk_over_the_cores(argv, threads):
    from lqlora_dagster.cli import parser, run_overrides

    assert run_overrides(parser().parse_args(argv)).get("error_table", {}).get("threads_per_chunk") == threads


@pytest.fixture(scope="module")
def ran(tmp_path_factory, tiny_llama_folder):
    """`lqlora register` then `lqlora run` on the tiny model, in a fresh home."""
    home = tmp_path_factory.mktemp("cli-home")
    registered = lqlora(home, "register", str(tiny_llama_folder), "--name", "tiny")
    assert registered.returncode == 0, registered.stderr
    assert "registered 'tiny'" in registered.stdout
    return home, lqlora(home, "run", *TINY_RUN, "--budget", "3")


def test_run_succeeds_and_prints_the_evaluation_table(ran):
    _, run = ran
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert any(line.split()[:2] == ["reference", "reference"] for line in lines), run.stdout  # blank budget
    assert "NaN" not in run.stdout and "created_at" not in run.stdout  # a table for people
    assert sum("lqlora-fisher" in line for line in lines) == 2  # before and after finetuning


def test_a_rerun_with_nothing_to_compute_starts_no_run(ran):
    """Same settings, model, data and code: the stored results are printed without
    launching Dagster; a changed input, or --rerun, launches it again."""
    import time

    home, first = ran
    logs = set((home / "logs").iterdir())
    start = time.monotonic()
    again = lqlora(home, "run", *TINY_RUN, "--budget", "3")
    assert again.returncode == 0, again.stderr
    assert time.monotonic() - start < 60
    assert "every stage of 'tiny' is current" in again.stderr
    assert again.stdout == first.stdout  # the same table
    assert set((home / "logs").iterdir()) == logs  # no run was started
    forced = lqlora(home, "run", *TINY_RUN, "--budget", "3", "--rerun")
    assert forced.returncode == 0 and "is current" not in forced.stderr and forced.stdout == first.stdout
    assert len(set((home / "logs").iterdir()) - logs) == 1


def _log_path(stderr: str) -> Path:
    line = next(line for line in stderr.splitlines() if line.startswith("full log: "))
    return Path(line.removeprefix("full log: ").split(";")[0])


STAGES = ("base_model", "task_data", "calibration_batches", "fisher_diagonals", "error_table", "allocation_plan",
          "decomposed_model", "finetuned_adapters", "evaluation")


def test_run_shows_one_line_per_stage_start_and_end(ran):
    _, run = ran
    lines = run.stderr.splitlines()
    for stage in STAGES:
        assert any(line.split()[:2] == [stage, "started"] for line in lines), stage
        assert any(line.split()[:3] == [stage, "done", "in"] for line in lines), stage
    assert any(line.startswith("error_table") and "14 matrices" in line for line in lines)  # its progress
    assert len(lines) <= 40, run.stderr
    assert "DEBUG" not in run.stderr and "BetaWarning" not in run.stderr  # the event log is in the file


def test_the_full_event_log_goes_to_a_file(ran):
    _, run = ran
    log = _log_path(run.stderr).read_text()
    assert "fisher: 4/4 sequences" in log
    assert "error_table: 14/14 matrices" in log
    assert "confirm lqlora-fisher @ 3 bits/param: every pick exact after" in log
    assert re.search(r"confirm lqlora-fisher, round 1: \d+/\d+ matrices \(exact rows, \d+s", log)  # a bar per round
    assert "decompose lqlora-fisher @ 3: 14/14 matrices" in log
    assert "finetune lqlora-fisher @ 3: 2/2 steps" in log
    assert "STEP_SUCCESS" in log  # Dagster's own events, at DEBUG


def test_sql_and_models_read_the_results(ran):
    home, _ = ran
    sql = lqlora(home, "sql", "ilp_bits_by_layer", "--model", "tiny")
    assert sql.returncode == 0 and "lqlora-fisher" in sql.stdout
    models = lqlora(home, "models")
    assert models.returncode == 0 and "tiny" in models.stdout


def test_a_failed_run_exits_1_and_says_where_to_look(ran, tmp_path):
    home, _ = ran
    # a registered dataset whose file is gone passes the argument checks, and fails its stage
    path = tmp_path / "notes.txt"
    path.write_text("Some notes to learn from. " * 400)
    assert lqlora(home, "data", "add", "notes", str(path)).returncode == 0
    path.unlink()
    run = lqlora(home, "run", *TINY_RUN, "--budget", "3", "--train", "notes")
    assert run.returncode == 1
    assert "the run failed" in run.stderr and "lqlora ui" in run.stderr
    assert "task_data: data path" in run.stderr and "does not exist" in run.stderr
    assert "Traceback" not in run.stderr and _log_path(run.stderr).is_file()
    verbose = lqlora(home, "run", *TINY_RUN, "--budget", "3", "--train", "notes", "--verbose")
    assert verbose.returncode == 1
    assert "STEP_FAILURE" in verbose.stderr and "does not exist" in verbose.stderr  # the log, live
    unknown = lqlora(home, "run", *TINY_RUN, "--budget", "3", "--train", "nope")
    assert unknown.returncode == 2 and "unknown dataset 'nope'" in unknown.stderr


def test_generate_streams_from_the_finetuned_model(ran):
    home, _ = ran
    out = lqlora(home, "generate", "--model", "tiny", "The state of the union", "--max-new-tokens", "5")
    assert out.returncode == 0, out.stderr
    assert "[tiny, lqlora-fisher @ 3 bits]" in out.stderr and "5 tokens in" in out.stderr and "tokens/s" in out.stderr
    ref = lqlora(home, "generate", "--model", "tiny", "Hello", "--method", "reference", "--max-new-tokens", "3")
    assert ref.returncode == 0 and "[tiny, reference]" in ref.stderr
    missing = lqlora(home, "generate", "--model", "tiny", "Hello", "--method", "qlora")
    assert missing.returncode == 2 and "no finetuned adapter for qlora" in missing.stderr
    too_long = lqlora(home, "generate", "--model", "tiny", "Hello", "--max-new-tokens", "100000")
    assert too_long.returncode == 2 and "exceed the model's 256 positions" in too_long.stderr
    assert "Traceback" not in too_long.stderr
    empty = lqlora(home, "generate", "--model", "tiny", "")
    assert empty.returncode == 2 and "the prompt is empty" in empty.stderr


def test_data_commands_register_list_and_remove(ran, tmp_path):
    home, _ = ran
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\ngreat,pos\nawful,neg\nfine,pos\n")
    added = lqlora(home, "data", "add", "reviews", str(path))
    assert added.returncode == 0 and "classify, 3 rows from csv" in added.stdout and "['neg', 'pos']" in added.stdout
    listed = lqlora(home, "data", "list")
    assert "reviews" in listed.stdout and "classify" in listed.stdout
    wrong = lqlora(home, "run", *TINY_RUN, "--train", "reviews")
    assert wrong.returncode == 2 and "causal LM without a classification head" in wrong.stderr
    bad = lqlora(home, "data", "add", "broken", str(path), "--label-col", "stars")
    assert bad.returncode == 2 and "column 'stars' is not in the file" in bad.stderr
    assert lqlora(home, "data", "remove", "reviews").returncode == 0
    assert "reviews" not in lqlora(home, "data", "list").stdout


def test_a_budget_no_plan_can_meet_is_refused_before_any_work(ran):
    home, _ = ran
    runs_before = len(list((home / "logs").iterdir()))
    run = lqlora(home, "run", *TINY_RUN, "--budget", "1.5")
    assert run.returncode == 2
    # every matrix at its cheapest config, each packed matrix's 32-bit header counted
    assert "budget 1.5 bits/param is below the cheapest plan of lqlora-fisher on 'tiny', 2.0625" in run.stderr
    assert "raise the budget to at least 2.063" in run.stderr
    assert len(list((home / "logs").iterdir())) == runs_before  # no run was started


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ranks"], "argument --ranks: expected at least one argument"),
        (["--ranks", "0", "-4"], "ranks must be an integer >= 0, got -4"),
        (["--ranks", "8", "8"], "ranks lists a rank twice: [8, 8]"),
        (["--ranks", "0", "8", "32"], "rank 32 is too large for 'tiny': its thinnest target matrix is 32 wide"),
        (["--max-size", "12MB"], "a total size of 12.00 MB leaves nothing for the quantized matrices: the tensors "
                                 "that are not targets (embeddings, norms, heads) alone take 12.58 MB"),
        (["--max-size", "12.59MB"], "12.59 MB is below the smallest lqlora-fisher model of 'tiny', 12.62 MB: 12.58 MB "
                                    "of tensors that are not targets"),
        (["--max-size", "12 parsecs"], "cannot read the size '12 parsecs'; write it like 80MB"),
        (["--budget-kind", "lowrank", "--budget", "2.5"], "budget 2.5 bits/param incl. low-rank is below the cheapest"),
        (["--lr-grid", "1e-3", "1e-3"], "lr_grid lists a learning rate twice: [0.001, 0.001]"),
        (["--lr-grid", "0", "1e-3"], "lr_grid must be a number in (0, 1), got 0.0"),
        (["--lr-grid", "1e-3", "3e-3", "--finetune-eval-every", "0"], "lr_grid picks by validation loss"),
    ],
)
def test_bad_ranks_and_sizes_are_refused_before_any_work(ran, argv, message):
    home, _ = ran
    runs_before = len(list((home / "logs").iterdir()))
    run = lqlora(home, "run", *TINY_RUN, *argv)
    assert run.returncode == 2 and message in run.stderr, run.stderr[-2000:]
    assert len(list((home / "logs").iterdir())) == runs_before


def test_bad_input_exits_2_with_the_fix(ran):
    home, _ = ran
    run = lqlora(home, "run", "--model", "not-registered")
    assert run.returncode == 2
    assert "lqlora register SOURCE --name not-registered" in run.stderr


def test_a_bad_confirm_margin_exits_2_before_running(ran):
    home, _ = ran
    run = lqlora(home, "run", *TINY_RUN, "--confirm-margin", "1.5")
    assert run.returncode == 2
    assert "confirm_margin must be a number in [0, 1), got 1.5" in run.stderr


def test_unregister_removes_the_partition(tmp_path, tiny_llama_folder):
    assert lqlora(tmp_path, "register", str(tiny_llama_folder), "--name", "gone").returncode == 0
    out = lqlora(tmp_path, "unregister", "gone")
    assert out.returncode == 0 and "unregistered 'gone'" in out.stdout
    assert "gone" not in lqlora(tmp_path, "models").stdout
    again = lqlora(tmp_path, "unregister", "gone")
    assert again.returncode == 2 and "is not registered" in again.stderr


def _dagster_dev_pid(port: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"dev" in args and str(port).encode() in args and any(a.endswith(b"dagster") for a in args):
                return int(entry.name)
    return None


def test_ui_stops_its_server_on_sigterm(tmp_path):
    """`lqlora ui` runs `dagster dev` in a session of its own; a SIGTERM to `lqlora`
    (a service manager's stop) must take the whole session down with it."""
    import os
    import signal
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ui = subprocess.Popen([LQLORA, "--home", str(tmp_path), "ui", "--port", str(port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2):
                    break
            except OSError:
                time.sleep(1)
        pid = _dagster_dev_pid(port)
        assert pid is not None, "dagster dev did not start"
        group = os.getpgid(pid)
        assert group != os.getpgid(ui.pid)  # its own session: a Ctrl-C in our shell would not reach it
        ui.send_signal(signal.SIGTERM)
        assert ui.wait(timeout=60) == 130  # stopped by a signal, as every command is
        with pytest.raises(ProcessLookupError):
            os.killpg(group, 0)  # nothing of the server is left
    finally:
        if ui.poll() is None:
            ui.kill()
