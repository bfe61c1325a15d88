"""Schema migrations: sql/schema.sql is the current shape, sql/migrations/NNN_what.sql the
changes, applied once each by Warehouse.init_schema. A home made by older code (the
schemas in tests/store/homes/, copied from the history of sql/schema.sql) must come out
with the same tables as a new one, its rows kept."""

import ast
import fnmatch
import re
from pathlib import Path

import duckdb
import pytest

from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.store.warehouse import (
    MIGRATIONS_DIR,
    SQL_DIR,
    Migration,
    Warehouse,
    apply_migration,
    migrations,
)

REPO = Path(__file__).resolve().parents[2]
HOMES = sorted((Path(__file__).parent / "homes").glob("*.sql"))
OLD_PLAN = (
    "INSERT INTO plans (plan_id, model, method, budget, table_key, objective, bound, gap, status, solve_s, "
    "bits_per_param) VALUES ('p1', 'tiny', 'lq-lora', 3.0, 't', 1.5, 1.5, 0.0, 'optimal', 0.1, 2.9)"
)


def shape(path: Path) -> list[tuple]:
    """Every column of every table: position, type, nullability, default."""
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute(
            "SELECT table_name, ordinal_position, column_name, data_type, is_nullable, column_default "
            "FROM information_schema.columns ORDER BY table_name, ordinal_position"
        ).fetchall()


def recorded(path: Path) -> list[tuple]:
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute("SELECT version, name, applied_at FROM schema_migrations ORDER BY version").fetchall()


@pytest.fixture(scope="module")
def new_home(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("new") / "lqlora.duckdb"
    Warehouse(path).init_schema()
    return path


def test_a_new_home_records_every_migration(new_home):
    known = migrations()
    assert [m.version for m in known] == list(range(1, len(known) + 1)) and len(known) >= 6
    assert [(v, n) for v, n, _ in recorded(new_home)] == [(m.version, m.name) for m in known]
    assert known[-1].name == "exports"


@pytest.mark.parametrize("old", HOMES, ids=[p.stem for p in HOMES])
def test_a_home_made_by_older_code_upgrades_to_the_new_shape(tmp_path, new_home, old):
    path = tmp_path / "lqlora.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute(old.read_text())
        con.execute(OLD_PLAN)
    Warehouse(path).init_schema()
    assert shape(path) == shape(new_home)
    assert [v for v, _, _ in recorded(path)] == [m.version for m in migrations()]
    with duckdb.connect(str(path), read_only=True) as con:
        kept = con.execute("SELECT plan_id, bits_per_param, budget_kind, total_bytes FROM plans").fetchall()
    assert kept == [("p1", 2.9, None, None)]


def test_the_oldest_home_lacks_what_the_migrations_add(tmp_path, new_home):
    """So the upgrade test above really adds columns, not only records migrations."""
    path = tmp_path / "first.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute(HOMES[[p.stem for p in HOMES].index("first_5965c35")].read_text())
    missing = {(t, c) for t, _, c, *_ in shape(new_home)} - {(t, c) for t, _, c, *_ in shape(path)}
    assert {("plans", "budget_kind"), ("plan_assignments", "rank"), ("evaluations", "lr"),
            ("train_steps", "val_loss")} <= missing


def test_init_schema_applies_each_migration_once(tmp_path):
    path = tmp_path / "lqlora.duckdb"
    Warehouse(path).init_schema()
    first = recorded(path)
    Warehouse(path).init_schema()
    assert recorded(path) == first  # same applied_at: nothing ran again


def test_a_failing_migration_leaves_no_half_change_and_no_record(tmp_path, new_home):
    path = tmp_path / "lqlora.duckdb"
    Warehouse(path).init_schema()
    bad = tmp_path / "007_broken.sql"
    bad.write_text("ALTER TABLE plans ADD COLUMN half INTEGER;\nSELECT * FROM no_such_table;\n")
    with duckdb.connect(str(path)) as con, pytest.raises(RuntimeError, match="007_broken.sql failed"):
        apply_migration(con, Migration(7, "broken", bad))
    assert shape(path) == shape(new_home)
    assert [v for v, _, _ in recorded(path)] == [m.version for m in migrations()]


def test_a_home_upgraded_by_newer_code_is_refused(tmp_path):
    path = tmp_path / "lqlora.duckdb"
    Warehouse(path).init_schema()
    with duckdb.connect(str(path)) as con:
        con.execute("INSERT INTO schema_migrations VALUES (99, 'from_the_future', current_timestamp)")
    with pytest.raises(LQLoRAInputError, match="newer lqlora-dagster .*migration 99.*upgrade lqlora-dagster"):
        Warehouse(path).init_schema()


@pytest.mark.parametrize(
    ("names", "error"),
    [
        (["001_a.sql", "003_b.sql"], "numbered \\[1, 3\\]"),
        (["001_a.sql", "1_b.sql"], "1_b.sql is not named NNN_what.sql"),
        (["001_a.sql", "002_Add-Column.sql"], "is not named NNN_what.sql"),
    ],
)
def test_misnamed_or_missing_migration_files_are_refused(tmp_path, names, error):
    for name in names:
        (tmp_path / name).write_text("SELECT 1;")
    with pytest.raises(ValueError, match=error):
        migrations(tmp_path)


def test_a_missing_migrations_folder_is_an_incomplete_install(tmp_path):
    with pytest.raises(LQLoRAInputError, match="install is incomplete; reinstall"):
        migrations(tmp_path / "migrations")


def test_schema_sql_holds_the_current_shape_and_no_alter():
    statements = [line for line in (SQL_DIR / "schema.sql").read_text().splitlines() if not line.startswith("--")]
    assert not [line for line in statements if "ALTER" in line.upper()], "put changes in sql/migrations/NNN_what.sql"


def test_the_wheel_carries_every_sql_file():
    """lqlora_dagster/sql links to sql/; pyproject's package-data must name each file."""
    line = re.search(r'^"lqlora_dagster" = (\[.*\])$', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    shipped = ast.literal_eval(line[1])
    files = [f"sql/{p.relative_to(SQL_DIR)}" for p in SQL_DIR.rglob("*.sql")]
    assert any(f.startswith("sql/migrations/") for f in files) and MIGRATIONS_DIR.is_dir()
    left_out = [f for f in files if not any(fnmatch.fnmatchcase(f, g) and f.count("/") == g.count("/")
                                            for g in shipped)]
    assert not left_out, f"pyproject.toml [tool.setuptools.package-data] leaves out {left_out}"
