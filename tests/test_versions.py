"""The hand-bumped version constants against tests/versions.lock.json: a change of the
code a version covers, without a bump, fails here (tests/versions.py says what covers what)."""

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.versions import COVERS, LOCK, REPO, fingerprint, main, problems, version_constants


def test_every_version_constant_says_what_it_covers():
    assert set(version_constants()) == set(COVERS)
    assert len(COVERS) >= 12


def test_no_version_changed_its_source_without_a_bump():
    found = problems(json.loads(LOCK.read_text()), fingerprint())
    assert not found, "\n".join(found)


@pytest.fixture()
def checkout(tmp_path) -> Path:
    """A checkout holding only PLAN_VERSION's stage and method modules, and its lock."""
    for path in [REPO / "lqlora_dagster/pipeline/planning.py", *(REPO / "lqlora_dagster/allocate").glob("*.py")]:
        target = tmp_path / path.relative_to(REPO)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    (tmp_path / "tests").mkdir()
    assert main(["--update", "--root", str(tmp_path)]) == 0
    return tmp_path


def _check(root: Path) -> list[str]:
    return problems(json.loads((root / "tests/versions.lock.json").read_text()), fingerprint(root))


def test_comments_docstrings_and_layout_do_not_count(checkout):
    uniform = checkout / "lqlora_dagster/allocate/uniform.py"
    text = uniform.read_text().replace('"""', '"""Reworded. ', 1)
    uniform.write_text("# a new comment\n\n" + text.replace("\n\n", "\n\n\n") + "\n# trailing comment\n")
    assert _check(checkout) == []


def test_a_code_edit_without_a_bump_is_caught_and_the_update_records_it(checkout, capsys):
    uniform = checkout / "lqlora_dagster/allocate/uniform.py"
    uniform.write_text(uniform.read_text() + "\nDEFAULT_MARGIN = 0.5\n")
    version = version_constants(checkout)["PLAN_VERSION"][1]
    assert _check(checkout) == [
        "PLAN_VERSION's source changed (files lqlora_dagster/allocate/uniform.py) but PLAN_VERSION is still "
        f"{version!r}: bump PLAN_VERSION if results change, then run `python -m tests.versions --update`"
    ]
    assert main(["--root", str(checkout)]) == 1
    assert "bump PLAN_VERSION" in capsys.readouterr().out

    planning = checkout / "lqlora_dagster/pipeline/planning.py"
    planning.write_text(re.sub(r"^PLAN_VERSION = .*$", 'PLAN_VERSION = "99"', planning.read_text(), flags=re.M))
    assert _check(checkout) == [
        f"PLAN_VERSION is now '99' (the lock has {version!r}): run `python -m tests.versions --update` to record it"
    ]
    assert main(["--update", "--root", str(checkout)]) == 0
    assert _check(checkout) == [] and main(["--root", str(checkout)]) == 0


def test_a_new_version_constant_must_say_what_it_covers(checkout):
    (checkout / "lqlora_dagster/allocate/extra.py").write_text('SOLVER_VERSION = "1"\n')
    with pytest.raises(ValueError, match="SOLVER_VERSION .* is not in COVERS"):
        fingerprint(checkout)
