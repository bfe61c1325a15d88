"""The package as a user installs it (a wheel, not this checkout): the schema and the
canned queries of the top-level sql/ travel inside it and work from anywhere."""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_canned_queries_work_from_an_installed_wheel(tmp_path):
    wheels, site, source = tmp_path / "wheels", tmp_path / "site", tmp_path / "source"
    # built from a copy, so the build leaves nothing in the checkout (links kept as links)
    skip = shutil.ignore_patterns(".git", ".venv", ".lqlora", "build", "*.egg-info", "__pycache__", "out")
    shutil.copytree(REPO, source, symlinks=True, ignore=skip)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)],
        check=True, cwd=tmp_path, capture_output=True,
    )
    (wheel,) = wheels.glob("lqlora_dagster-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    script = (
        "import lqlora_dagster, pathlib;"
        "from lqlora_dagster.store.warehouse import SQL_DIR, Warehouse;"
        f"assert pathlib.Path(lqlora_dagster.__file__).is_relative_to({str(site)!r}), lqlora_dagster.__file__;"
        "w = Warehouse(pathlib.Path('x.duckdb')); w.init_schema();"
        "print(sorted(p.stem for p in (SQL_DIR / 'queries').glob('*.sql')));"
        "print(len(w.run_named_query('error_vs_bits', {'model': 'm'})))"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "ilp_bits_by_layer" in out.stdout and out.stdout.strip().endswith("0")
