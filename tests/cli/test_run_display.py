"""What `lqlora run` prints per stage, from a stream of run events: a start and an end
line with the asset's summary, at most two progress lines per stage off a terminal (a
bar on one), and the failure with its message."""

import io

from lqlora_dagster.run_display import RunDisplay, RunEvent


def feed(display: RunDisplay, n: int = 100) -> None:
    display.show(RunEvent("STEP_START", "error_table"))
    for i in range(1, n + 1):
        display.show(RunEvent("LOG", "error_table", f"error_table: {i}/{n} matrices (m{i}, {i}s)"))
    display.show(RunEvent("LOG", "error_table", "chunk 3: 12 matrices, 0 new rows"))  # not progress
    display.show(RunEvent("ASSET_MATERIALIZATION", "error_table", summary="43,200 rows"))


def test_off_a_terminal_a_stage_takes_a_few_lines():
    out = io.StringIO()
    display = RunDisplay(out, tty=False)
    feed(display)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["error_table", "started"]
    assert [line.split(": ", 1)[1].split(",")[0] for line in lines[1:-1]] == ["34/100 matrices", "67/100 matrices"]
    assert lines[-1].startswith("error_table") and lines[-1].endswith("done in 0s: 43,200 rows")


def test_on_a_terminal_progress_is_a_bar_that_leaves_the_done_line():
    out = io.StringIO()
    display = RunDisplay(out, tty=True)
    feed(display, 10)
    text = out.getvalue()
    assert "10/10" in text and "matrices" in text  # the bar, redrawn in place
    assert text.rstrip().splitlines()[-1].endswith("done in 0s: 43,200 rows")


def test_a_failed_stage_says_why_and_is_remembered():
    out = io.StringIO()
    display = RunDisplay(out, tty=False)
    display.show(RunEvent("STEP_START", "allocation_plan"))
    display.show(RunEvent("STEP_FAILURE", "allocation_plan", error="budget 1.5 bits/param is below the cheapest plan"))
    assert "allocation_plan      FAILED after 0s: budget 1.5 bits/param" in out.getvalue()
    assert display.failed == [("allocation_plan", "budget 1.5 bits/param is below the cheapest plan")]


def test_events_of_other_steps_are_ignored():
    out = io.StringIO()
    display = RunDisplay(out, tty=False)
    display.show(RunEvent("LOG", None, "fisher: 1/2 sequences"))
    display.show(RunEvent("LOG", "fisher_diagonals", "fisher: 1/2 sequences"))  # before its start
    assert out.getvalue() == ""
