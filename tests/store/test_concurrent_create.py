"""A new home opened by several processes at once: each gets a database, none sees a
half-made file (DuckDB writes a new file's header after creating it)."""

import subprocess
import sys
import time
from pathlib import Path

from lqlora_dagster.store.warehouse import Warehouse

REPO = Path(__file__).resolve().parents[2]

OPEN_AT = """
import sys, time
from pathlib import Path
from lqlora_dagster.store.warehouse import Warehouse
start = float(sys.argv[2])
while time.time() < start:
    pass
try:
    Warehouse(Path(sys.argv[1])).init_schema()
    print("ok")
except Exception as err:
    print(f"failed: {err}")
"""


def test_eight_processes_creating_one_new_home_all_get_the_database(tmp_path):
    for round_ in range(4):
        path = tmp_path / f"home{round_}" / "lqlora.duckdb"
        start = time.time() + 2.5  # every process has imported duckdb by then
        procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT, str(path), str(start)], cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(8)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert [out.strip() for out, _ in outs] == ["ok"] * 8, outs
        assert Warehouse(path).query("SELECT count(*) AS n FROM schema_migrations")["n"][0] > 0
        assert sorted(p.name for p in path.parent.iterdir()) == ["lqlora.duckdb"]
