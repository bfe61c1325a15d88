"""The `lqlora` command as users run it: the installed entry point in a subprocess,
its help, a whole run on a tiny model with progress, and its exit codes."""

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
    for command in ("register", "run", "unregister", "sql", "models", "ui"):
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
    assert any(line.split()[:2] == ["reference", "NaN"] for line in lines), run.stdout
    assert sum("lqlora-fisher" in line for line in lines) == 2  # before and after finetuning


def test_run_shows_progress_of_each_long_stage(ran):
    _, run = ran
    log = run.stderr
    assert "fisher: 4/4 sequences" in log
    assert "error_table lqlora-fisher: 7/7 model.layers.1.mlp.down_proj" in log
    assert "confirm lqlora-fisher @ 3: every pick exact after" in log
    assert "decompose lqlora-fisher @ 3: 14/14 matrices" in log
    assert "finetune lqlora-fisher @ 3: step 2/2" in log
    assert "BetaWarning" not in log  # no library noise between the progress lines


def test_sql_and_models_read_the_results(ran):
    home, _ = ran
    sql = lqlora(home, "sql", "ilp_bits_by_layer", "--model", "tiny")
    assert sql.returncode == 0 and "lqlora-fisher" in sql.stdout
    models = lqlora(home, "models")
    assert models.returncode == 0 and "tiny" in models.stdout


def test_a_failed_run_exits_1_and_says_where_to_look(ran):
    home, _ = ran
    # 1.5 bits/param passes the argument checks, but no plan of the grid is that cheap (2.05)
    run = lqlora(home, "run", *TINY_RUN, "--budget", "1.5")
    assert run.returncode == 1
    assert "the run failed" in run.stderr and "lqlora ui" in run.stderr
    assert "below the cheapest plan" in run.stderr


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
