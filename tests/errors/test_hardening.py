"""The doors a demanding user tries: canned SQL only, options that select nothing,
generation past the context, interrupts, stale runs, the UI's shutdown, and help that
says what each flag does. Each test is named after the case it closes."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import duckdb
import pandas as pd
import pytest

from lqlora_dagster import cli
from lqlora_dagster.cli_args import flags_of
from lqlora_dagster.knobs import default_of, knob_fields
from lqlora_dagster.pipeline.settings import STAGE_SETTINGS
from lqlora_dagster.store.warehouse import Warehouse
from lqlora_dagster.text_tables import text_table

LQLORA = str(Path(sys.executable).with_name("lqlora"))


def run_cli(home: Path, *argv: str, capsys) -> tuple[int, str, str]:
    code = cli.main(["--home", str(home), *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    """A fresh home; the CLI sets LQLORA_HOME and DAGSTER_HOME in this process, so each
    test gets its own (the subprocesses it starts inherit them)."""
    path = tmp_path / "home"
    path.mkdir()
    monkeypatch.setenv("LQLORA_HOME", str(path))
    monkeypatch.setenv("DAGSTER_HOME", str(path / "dagster"))
    return path


@pytest.fixture()
def warehouse_home(home) -> Path:
    Warehouse(home / "lqlora.duckdb").init_schema()
    return home


@pytest.fixture()
def tiny_home(home, tiny_llama_folder, capsys) -> Path:
    """A home with the tiny Llama (256 positions) registered as 'tiny'."""
    code, _, err = run_cli(home, "register", str(tiny_llama_folder), "--name", "tiny", capsys=capsys)
    assert code == 0, err
    return home


# --- lqlora sql: canned queries only, on a connection that cannot write ----------------------


@pytest.mark.parametrize("name", ["../schema", "../../../../tmp/evil", "/tmp/evil", "queries/error_vs_bits",
                                  "error_vs_bits.sql"])
def test_sql_path_outside_the_queries_folder_is_refused(warehouse_home, tmp_path, name, capsys):
    target = tmp_path / "written.csv"
    Path("/tmp/evil.sql").write_text(f"COPY (SELECT 42) TO '{target}'")
    code, out, err = run_cli(warehouse_home, "sql", name, capsys=capsys)
    assert code == 2 and "unknown query" in err and "known queries: best_config_per_layer_type" in err
    assert not target.exists() and out == ""


def test_sql_connection_cannot_write_files_or_the_database(warehouse_home, tmp_path):
    w = Warehouse(warehouse_home / "lqlora.duckdb")
    target = tmp_path / "leak.csv"
    for statement in (f"COPY (SELECT 1) TO '{target}'", "CREATE TABLE t (x INTEGER)",
                      "SELECT * FROM read_csv('/etc/passwd')", "SET enable_external_access = true",
                      f"ATTACH '{tmp_path / 'other.duckdb'}'"):
        with pytest.raises(duckdb.Error):
            w.query(statement, sandboxed=True)
    assert not target.exists() and not (tmp_path / "other.duckdb").exists()
    assert w.query("SELECT count(*) AS n FROM models", sandboxed=True)["n"].iloc[0] == 0  # reading works


def test_sql_never_creates_a_database(home, capsys):
    code, _, err = run_cli(home, "sql", "error_vs_bits", capsys=capsys)
    assert code == 2 and "no warehouse at" in err and "lqlora run" in err
    assert not (home / "lqlora.duckdb").exists()


def test_sql_says_it_used_the_default_model(warehouse_home, capsys):
    code, out, err = run_cli(warehouse_home, "sql", "error_vs_bits", capsys=capsys)
    assert code == 0 and "[model smollm2-135m, the default; --model picks another]" in err
    assert out.strip() == "(no rows)"
    code, _, err = run_cli(warehouse_home, "sql", "error_vs_bits", "--model", "other", capsys=capsys)
    assert code == 0 and "the default" not in err


# --- options that select nothing are refused before any work -----------------------------


SELECTS_NOTHING = {
    "finetune methods not planned": (["--finetune-methods", "qlora"],
                                     r"--finetune-methods qlora: not planned in this run \(planned: lqlora-fisher\)"),
    "finetune budgets not planned": (["--finetune-budgets", "9"],
                                     r"--finetune-budgets 9: no plan of this run has that budget \(its budgets: 3.25\)"),
    "finetune len beyond positions": (["--finetune-len", "100000"],
                                      r"--finetune-len 100000 is longer than 'tiny' can attend to \(256 positions\)"),
    "eval len beyond positions": (["--eval-len", "100000"], r"--eval-len 100000 is longer than 'tiny'"),
    "calibration len beyond positions": (["--calibration-len", "257"], r"use at most --calibration-len 256"),
}


@pytest.mark.parametrize("case", sorted(SELECTS_NOTHING))
def test_option_that_selects_nothing_is_refused_before_work(tiny_home, case, capsys):
    argv, message = SELECTS_NOTHING[case]
    fits = [] if "--eval-len" in argv else ["--eval-len", "64"]  # the default 512 exceeds the tiny model's 256
    code, _, err = run_cli(tiny_home, "run", "--model", "tiny", *fits, *argv, capsys=capsys)
    assert code == 2 and re.search(message, err), err
    assert not (tiny_home / "logs").exists()  # no run was started


@pytest.mark.parametrize("flag", ["--lr-grid", "--finetune-methods", "--max-size", "--ranks", "--budget"])
def test_list_flag_with_no_values_is_refused(flag):
    out = subprocess.run([LQLORA, "run", flag], capture_output=True, text=True)
    assert out.returncode == 2 and f"argument {flag}: expected at least one argument" in out.stderr


# --- generate: what the user typed is checked before the model loads --------------------------


@pytest.mark.parametrize("argv, message", [
    (["--max-new-tokens", "0", "hi"], "--max-new-tokens must be at least 1, got 0"),
    (["--max-new-tokens", "-1", "hi"], "--max-new-tokens must be at least 1, got -1"),
])
def test_generate_max_new_tokens_zero_or_negative_is_refused(home, argv, message, capsys):
    code, _, err = run_cli(home, "generate", *argv, capsys=capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_generate_unregistered_model_advises_register_not_run(home, capsys):
    code, _, err = run_cli(home, "generate", "--model", "nosuch", "hi", capsys=capsys)
    assert code == 2
    assert "model 'nosuch' is not registered" in err and "lqlora register SOURCE --name nosuch" in err


def test_generate_checks_prompt_and_context_before_loading(tiny_llama_folder):
    from transformers import AutoConfig, AutoTokenizer

    from lqlora_dagster.errors import LQLoRAInputError
    from lqlora_dagster.generate import check_room, prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_folder)
    with pytest.raises(LQLoRAInputError, match="the prompt is empty"):
        prompt_ids(tokenizer, "", chat=False)
    with pytest.raises(LQLoRAInputError, match="the prompt is empty"):
        prompt_ids(tokenizer, "  \n", chat=False)
    config = AutoConfig.from_pretrained(tiny_llama_folder)  # 256 positions
    with pytest.raises(LQLoRAInputError, match=r"10 tokens plus 100000 new ones exceed the model's 256 positions; "
                                               r"ask for at most --max-new-tokens 246"):
        check_room(config, 10, 100_000)
    with pytest.raises(LQLoRAInputError, match="shorten the prompt"):
        check_room(config, 300, 1)
    check_room(config, 10, 246)  # exactly fits


# --- interrupts: exit code 130, one line, the Dagster run canceled ---------------------------


def _instance_runs(home: Path) -> list:
    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        return [r.dagster_run for r in instance.get_run_records()]


def _wait_for_line(path_glob, pattern: str, proc, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for log in path_glob():
            if re.search(pattern, log.read_text(errors="replace")):
                return
        assert proc.poll() is None, "the process ended before the line appeared"
        time.sleep(0.2)
    raise AssertionError(f"no line matching {pattern!r} within {timeout} s")


TINY = ["--model", "tiny", "--rank", "4", "--grid", "reduced", "--calibration-sequences", "4",
        "--calibration-len", "64", "--steps", "200", "--eval-windows", "2", "--eval-len", "64", "--budget", "3"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupted_run_exits_130_and_is_marked_canceled(tiny_home, sig):
    """Ctrl-C reaches the whole foreground process group (the run and its step
    processes); a timeout's SIGTERM reaches the run alone."""
    proc = subprocess.Popen([LQLORA, "--home", str(tiny_home), "run", *TINY], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for_line(lambda: (tiny_home / "logs").glob("*.log"), r"finetune lqlora-fisher @ 3: \d+/200 steps", proc)
    (os.killpg if sig == signal.SIGINT else os.kill)(proc.pid, sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "the run failed" not in err and "FAILED" not in err
    assert re.search(r"^finetuned_adapters +stopped after .* \(interrupted\)$", err, re.M), err
    assert err.strip().splitlines()[-1].startswith("interrupted: the run is marked canceled in Dagster")
    (run,) = _instance_runs(tiny_home)
    assert run.status == dg.DagsterRunStatus.CANCELED


def test_run_killed_with_sigkill_is_marked_failed_at_next_start(tiny_home):
    from assets.runs import fail_orphaned_runs

    proc = subprocess.Popen([LQLORA, "--home", str(tiny_home), "run", *TINY], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_for_line(lambda: (tiny_home / "logs").glob("*.log"), r"calibration_batches|fisher", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    (run,) = _instance_runs(tiny_home)
    assert run.status == dg.DagsterRunStatus.STARTED  # what Dagster alone leaves behind
    with dg.DagsterInstance.from_config(str(tiny_home / "dagster")) as instance:
        assert fail_orphaned_runs(instance) == [run.run_id]
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
        assert fail_orphaned_runs(instance) == []  # once


def test_ctrl_c_while_waiting_exits_130_with_one_line(warehouse_home):
    """Any command stopped while it waits (here for the warehouse another process holds)."""
    import threading

    holder = duckdb.connect(str(warehouse_home / "lqlora.duckdb"))
    lines: list[str] = []
    try:
        proc = subprocess.Popen([LQLORA, "--home", str(warehouse_home), "generate", "hello"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
        reader.start()
        deadline = time.monotonic() + 90
        while not any("another process holds it" in line for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, lines
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        reader.join(timeout=10)
    finally:
        holder.close()
    err = "".join(lines)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted"


# --- lqlora ui: a second signal while it stops ----------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serving(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2):
            return True
    except OSError:
        return False


@pytest.mark.browser
def test_ui_second_sigterm_while_stopping_leaves_nothing_running(home):
    port = _free_port()
    proc = subprocess.Popen([LQLORA, "--home", str(home), "ui", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not _serving(port):
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
        time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    start = time.monotonic()
    _, err = proc.communicate(timeout=40)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert time.monotonic() - start < 15  # the second signal kills what is left at once
    assert not _serving(port)
    left = subprocess.run(["pgrep", "-f", f"dagster.*{port}"], capture_output=True, text=True).stdout.split()
    assert left == [], left


# --- help, version and tables -------------------------------------------------------------


def _flag_help(text: str, flag: str) -> str:
    """The help paragraph argparse prints for `flag`, joined into one line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(flag))
    body = [lines[start].strip()[len(flag):]]
    for line in lines[start + 1:]:
        if not line.startswith(" " * 10) or line.strip().startswith("--"):
            break
        body.append(line.strip())
    return " ".join(" ".join(body).split())


def test_each_boolean_flag_help_describes_what_the_flag_does():
    """`--no-confirm` once said what confirming does; each bool flag's help now is the
    description of the value it sets, and names that value."""
    text = subprocess.run([LQLORA, "run", "--help"], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"}).stdout
    checked = 0
    for cls in STAGE_SETTINGS.values():
        for f, k, tp in knob_fields(cls):
            flags = flags_of(cls, f.name, k.flags)
            if tp is not bool or not flags:
                continue
            sets = not default_of(f)
            help_text = _flag_help(text, flags[0])
            expected = " ".join((k.help if sets else k.off).split())
            assert help_text.startswith(expected), (flags[0], help_text)
            assert f"sets {f.name} to {str(sets).lower()}" in help_text, (flags[0], help_text)
            if not sets:
                assert k.off != k.help
            checked += 1
    assert checked >= 5  # --exhaustive, --no-confirm, --no-reference, --fixed-rank-plans, gradient checkpointing


def test_help_texts_hold_no_measured_figures():
    text = subprocess.run([LQLORA, "run", "--help"], capture_output=True, text=True).stdout
    assert not re.search(r"\d+-\d+%|bench/results", text)


def test_version_flag():
    out = subprocess.run([LQLORA, "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and re.fullmatch(r"lqlora \d+\.\d+\.\d+\S*\n", out.stdout)


def test_models_on_an_empty_home_is_a_sentence(home, capsys):
    code, out, _ = run_cli(home, "models", capsys=capsys)
    assert code == 0 and out.startswith("no models registered yet: `lqlora register SOURCE` adds one")
    assert "Empty DataFrame" not in out


def test_tables_show_blanks_not_nan_and_no_timestamps():
    frame = pd.DataFrame({"method": ["reference", "lqlora"], "budget": [float("nan"), 3.25],
                          "created_at": pd.to_datetime(["2026-01-01", "2026-01-02"]), "rank": [None, 16]})
    text = text_table(frame)
    assert "NaN" not in text and "None" not in text and "created_at" not in text and "2026" not in text
    assert text.splitlines()[1].split() == ["reference"] and text.splitlines()[2].split() == ["lqlora", "3.25", "16"]
    assert "created_at" in text_table(frame, timestamps=True)
    assert text_table(frame.iloc[:0]) == "(no rows)"
