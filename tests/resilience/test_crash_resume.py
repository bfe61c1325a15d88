"""kill -9 in the middle of a run, then re-materialize: nothing finished is redone,
nothing half-done is kept, and the result equals an uninterrupted run's.

Each run is a real `dg.materialize` in its own process group (tests/resilience/
crash_driver.py) on the tiny model; the kill is a real SIGKILL to that group. The
finetuning run is killed where the driver paused it, a known step between two
checkpoints; the error table is killed half a matrix after a progress line.
"""

import re
import time
from pathlib import Path

import pytest

from lqlora_dagster.store.warehouse import Warehouse
from lqlora_dagster.training.state import checkpoint_step
from tests.resilience.crash_driver import PAUSED
from tests.resilience.runs import Run, new_home

N_MATRICES = 14  # 2 layers x 7 targets
TABLE_CONFIG = {
    "calibration_batches": {"config": {"n_sequences": 4, "seq_len": 64}},
    # the exhaustive path: one decomposition per config, so a matrix takes a while
    "error_table": {"config": {"methods": ["lqlora"], "rank": 4, "grid": "reduced", "fast": False}},
}
TRAIN_CONFIG = {
    "calibration_batches": {"config": {"n_sequences": 4, "seq_len": 64}},
    "error_table": {"config": {"methods": ["lqlora"], "rank": 4, "grid": "reduced"}},
    "allocation_plan": {"config": {"budgets": [3.0]}},
    "finetuned_adapters": {"config": {"steps": 12, "batch_size": 2, "seq_len": 64, "reference": False}},
}


def table_rows(home: Path):
    return Warehouse(home / "lqlora.duckdb").query(
        "SELECT table_key, matrix, config, error FROM quant_errors ORDER BY table_key, matrix, config"
    )


MATRIX_DONE = r"error_table: \d+/\d+ matrices \((\S+), "


def test_kill_during_error_table_redoes_only_the_matrix_in_flight(tmp_path, tiny_llama_folder):
    home = new_home(tmp_path, "home", tiny_llama_folder)
    first = Run(home, "error_table", TABLE_CONFIG)
    first.wait_for(r"error_table: 3/14 matrices")
    (t2, _), (t3, _) = first.matching(MATRIX_DONE)[-2:]
    time.sleep((t3 - t2) / 2)  # kill in the middle of the 4th matrix
    killed_at = first.kill()
    reported = {m.group(1) for _, line in first.matching(MATRIX_DONE) if (m := re.search(MATRIX_DONE, line))}

    after_kill = table_rows(home)
    per_matrix = after_kill.groupby("matrix").size()
    assert (per_matrix == 24).all(), f"a matrix was committed in part: {per_matrix.to_dict()}"
    stored = set(per_matrix.index)
    assert reported <= stored, "every matrix the log reported as done is in DuckDB"
    # a matrix's rows are committed, then its progress line is written: a kill between the
    # two (seen under load) keeps one matrix the log never reported, never more
    assert len(stored - reported) <= 1, f"matrices stored but never reported: {stored - reported}"
    done = len(per_matrix)
    assert 3 <= done < N_MATRICES

    second = Run(home, "error_table", TABLE_CONFIG)
    assert second.finish() == 0, second.log_tail()
    recomputed = {m.group(1) for _, line in second.matching(MATRIX_DONE) if (m := re.search(MATRIX_DONE, line))}
    assert not (recomputed & stored), "a matrix committed before the kill was computed again"
    assert len(recomputed) == N_MATRICES - done

    final = table_rows(home)
    assert len(final) == N_MATRICES * 24
    assert not final.duplicated(["table_key", "matrix", "config"]).any()

    # the work lost to the kill: time since the last committed matrix (one matrix at most)
    times = [t for t, _ in first.matching(MATRIX_DONE)]
    per_matrix_s = [b - a for a, b in zip(times, times[1:])]
    lost_s = killed_at - times[-1]
    print(
        f"\ncrash-resume error_table: {done}/{N_MATRICES} matrices kept, {len(recomputed)} computed after restart, "
        f"0 recomputed; work lost {lost_s:.2f}s (one matrix takes {max(per_matrix_s, default=0):.2f}s)"
    )

    clean = new_home(tmp_path, "clean", tiny_llama_folder)
    assert Run(clean, "error_table", TABLE_CONFIG).finish() == 0
    reference = table_rows(clean)
    assert list(final["matrix"] + final["config"]) == list(reference["matrix"] + reference["config"])
    assert (abs(final["error"] - reference["error"]) <= 1e-6 * reference["error"].abs() + 1e-12).all()


STEP = r"finetune lqlora @ 3: (\d+)/12 steps \(loss ([^)]+)\)"


def train_rows(home: Path):
    return Warehouse(home / "lqlora.duckdb").query("SELECT run, step, loss FROM train_steps ORDER BY run, step")


def saved_checkpoints(home: Path) -> list[int | None]:
    """The step of each training checkpoint on disk (one folder per finetuning run)."""
    root = home / "checkpoints"
    return [checkpoint_step(d) for d in sorted(root.iterdir())] if root.is_dir() else []


def test_kill_during_finetuning_resumes_from_the_last_checkpoint(tmp_path, tiny_llama_folder):
    home = new_home(tmp_path, "home", tiny_llama_folder)
    # the driver stops after step 7 (checkpoint 5 on disk, steps 6 and 7 only in memory)
    # and the kill lands there, never after checkpoint 10 however loaded the machine is
    first = Run(home, "finetuned_adapters", TRAIN_CONFIG, pause_after_step=7)
    first.wait_for(re.escape(PAUSED.format(7)))
    first.kill()
    assert first.orphans() == [], "a process of the killed run outlived the kill"
    steps_before = [int(re.search(STEP, line).group(1)) for _, line in first.matching(STEP)]
    assert steps_before == list(range(1, 8)), first.log_tail()
    assert saved_checkpoints(home) == [5]
    assert train_rows(home).empty, "steps are written once the adapter is committed, never in part"

    second = Run(home, "finetuned_adapters", TRAIN_CONFIG)
    assert second.finish() == 0, second.log_tail()
    assert second.matching(r"resuming from the checkpoint at step 5"), second.log_tail()
    steps_after = [int(re.search(STEP, line).group(1)) for _, line in second.matching(STEP)]
    assert steps_after == list(range(6, 13))
    redone = [s for s in steps_before if s > 5]
    assert redone == [6, 7]
    print(
        f"\ncrash-resume finetune: killed after step {max(steps_before)}, resumed at step 6; "
        f"{len(redone)} steps redone (checkpoint every 5)"
    )

    rows = train_rows(home)
    assert list(rows["step"]) == list(range(1, 13)) and rows["run"].nunique() == 1
    assert saved_checkpoints(home) == [], "the committed adapter left its checkpoint behind"

    clean = new_home(tmp_path, "clean", tiny_llama_folder)
    assert Run(clean, "finetuned_adapters", TRAIN_CONFIG).finish() == 0
    reference = train_rows(clean)
    # the resumed run restored weights and AdamW moments: the same losses as without the kill
    assert list(reference["run"]) == list(rows["run"])
    assert rows["loss"].tolist() == pytest.approx(reference["loss"].tolist(), rel=1e-5)
