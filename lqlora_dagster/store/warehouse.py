"""The DuckDB warehouse: short connections, retry on lock, keyed replace-writes.

DuckDB lets one process hold a file read-write. Pipeline steps, the CLI and the UI's
code server all touch the same file, so every operation opens a connection, does
its work in one transaction and closes; a lock held by another process is retried
with backoff instead of surfacing as an error.
"""

import os
import random
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pandas as pd

from lqlora_dagster.errors import LQLoRAInputError

# the schema and canned queries: top-level sql/, reached through the package link
# lqlora_dagster/sql -> ../sql (a wheel carries them as package data)
SQL_DIR = Path(__file__).resolve().parents[1] / "sql"
MIGRATIONS_DIR = SQL_DIR / "migrations"
_MIGRATION_FILE = re.compile(r"(\d{3})_([a-z0-9_]+)\.sql")
_LOCK_MARKERS = ("Could not set lock", "Conflicting lock", "database is locked", "lock on file")


def _is_lock_error(err: Exception) -> bool:
    return any(m in str(err) for m in _LOCK_MARKERS)


@dataclass(frozen=True)
class Migration:
    """sql/migrations/NNN_name.sql: one change to the tables, applied once per home."""

    version: int
    name: str
    path: Path


def migrations(folder: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The numbered migrations in order. A stray name or a gap in the numbers is refused,
    so a misnamed file is never silently skipped."""
    if not folder.is_dir():
        raise LQLoRAInputError(f"{folder} is missing: this lqlora-dagster install is incomplete; reinstall it")
    found = []
    for path in sorted(folder.glob("*.sql")):
        match = _MIGRATION_FILE.fullmatch(path.name)
        if match is None:
            raise ValueError(f"{path} is not named NNN_what.sql (three digits, lower-case words); rename it")
        found.append(Migration(int(match[1]), match[2], path))
    numbers = [m.version for m in found]
    if numbers != list(range(1, len(found) + 1)):
        raise ValueError(f"the migrations in {folder} are numbered {numbers}; number them 1, 2, ... without gaps")
    return found


def apply_migration(con: duckdb.DuckDBPyConnection, migration: Migration) -> None:
    """Run one migration and record it in schema_migrations, in one transaction: a failing
    migration leaves neither a half-changed table nor a record."""
    con.execute("BEGIN")
    try:
        con.execute(migration.path.read_text())
        con.execute(
            "INSERT INTO schema_migrations VALUES (?, ?, current_timestamp)", [migration.version, migration.name]
        )
        con.execute("COMMIT")
    except Exception as err:
        con.execute("ROLLBACK")
        raise RuntimeError(f"schema migration {migration.path.name} failed: {err}") from err


class Warehouse:
    def __init__(self, path: Path, lock_timeout_s: float = 120.0):
        self.path = Path(path)
        self.lock_timeout_s = lock_timeout_s

    @contextmanager
    def connect(self, read_only: bool = False, sandboxed: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """`sandboxed`: read-only, and DuckDB refuses every file but this database (no
        COPY TO, no read_csv of other files, no ATTACH, no extensions), locked so a query
        cannot switch it back."""
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.05
        config = {"enable_external_access": False, "lock_configuration": True} if sandboxed else {}
        read_only = read_only or sandboxed
        waiting_since, told = time.monotonic(), False
        while True:
            try:
                if not read_only and not self.path.exists():
                    self._create()
                con = duckdb.connect(str(self.path), read_only=read_only, config=config)
                break
            except (duckdb.IOException, duckdb.Error) as err:
                if _is_lock_error(err) and time.monotonic() < deadline:
                    if not told and time.monotonic() - waiting_since > 2:
                        print(f"waiting for {self.path}: another process holds it (up to {self.lock_timeout_s:g} s)",
                              file=sys.stderr, flush=True)
                        told = True
                    time.sleep(delay * (1 + random.random()))
                    delay = min(delay * 2, 2.0)
                    continue
                raise self._explain(err) from err
            except OSError as err:
                raise self._explain(err) from err
        try:
            yield con
        finally:
            con.close()

    def _create(self) -> None:
        """Make a new, empty database file whole before anyone can see it: DuckDB writes
        a new file's header after creating it, so a second process opening the name in
        between would read a file that is not (yet) a database. The file is built under a
        private name and linked into place; a process that loses the race uses the winner's."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        scratch = self.path.with_name(f".{self.path.name}.{os.getpid()}.new")
        try:
            duckdb.connect(str(scratch)).close()
            os.link(scratch, self.path)
        except FileExistsError:
            pass  # another process made it first
        except OSError:
            pass  # no hard links on this file system: DuckDB creates the file itself
        finally:
            scratch.unlink(missing_ok=True)
            scratch.with_name(scratch.name + ".wal").unlink(missing_ok=True)

    def _explain(self, err: Exception) -> LQLoRAInputError:
        text = str(err)
        if _is_lock_error(err):
            return LQLoRAInputError(
                f"the warehouse {self.path} stayed locked by another process for {self.lock_timeout_s:g} s; "
                "stop the other writer (a long `duckdb` shell?) and retry"
            )
        if "not a valid DuckDB database" in text or "Corrupt" in text or "corrupt" in text:
            return LQLoRAInputError(
                f"{self.path} is not a readable DuckDB database ({text.splitlines()[0]}); move it away "
                "and re-materialize to rebuild it"
            )
        if "Permission denied" in text or "Read-only" in text or "read-only" in text:
            return LQLoRAInputError(
                f"cannot write the warehouse {self.path}: permission denied; point LQLORA_HOME at a writable folder"
            )
        return LQLoRAInputError(f"cannot open the warehouse {self.path}: {text.splitlines()[0]}")

    def init_schema(self) -> None:
        """Bring the file to the current shape: schema.sql creates the tables a home lacks
        (a new home gets each at its current shape), then each numbered migration the file
        has not recorded adds what a home made by older code lacks. Every CLI command calls
        this, so a current home costs the CREATE IF NOT EXISTS and one query."""
        known = migrations()
        with self.connect() as con:
            con.execute((SQL_DIR / "schema.sql").read_text())
            applied = {v for (v,) in con.execute("SELECT version FROM schema_migrations").fetchall()}
            newer = sorted(applied - {m.version for m in known})
            if newer:
                raise LQLoRAInputError(
                    f"the warehouse {self.path} was upgraded by a newer lqlora-dagster (schema migration "
                    f"{newer[-1]}; this one knows up to {len(known)}); upgrade lqlora-dagster or point "
                    "LQLORA_HOME at another folder"
                )
            for migration in known:
                if migration.version not in applied:
                    apply_migration(con, migration)

    def replace_rows(self, table: str, frame: pd.DataFrame, where: dict[str, object]) -> int:
        """Delete the rows matching `where` and insert `frame`, in one transaction."""
        clause = " AND ".join(f'"{k}" = ?' for k in where) or "TRUE"
        with self.connect() as con:
            con.execute("BEGIN")
            try:
                con.execute(f'DELETE FROM "{table}" WHERE {clause}', list(where.values()))
                self._insert(con, table, frame)
                con.execute("COMMIT")
            except Exception:
                con.execute("ROLLBACK")
                raise
        return len(frame)

    def upsert(self, table: str, frame: pd.DataFrame, keys: list[str]) -> int:
        """Insert `frame`, replacing rows with the same primary-key values."""
        if frame.empty:
            return 0
        with self.connect() as con:
            con.execute("BEGIN")
            try:
                con.register("_incoming", frame[keys])
                match = " AND ".join(f't."{k}" = i."{k}"' for k in keys)
                con.execute(f'DELETE FROM "{table}" t WHERE EXISTS (SELECT 1 FROM _incoming i WHERE {match})')
                con.unregister("_incoming")
                self._insert(con, table, frame)
                con.execute("COMMIT")
            except Exception:
                con.execute("ROLLBACK")
                raise
        return len(frame)

    @staticmethod
    def _insert(con: duckdb.DuckDBPyConnection, table: str, frame: pd.DataFrame) -> None:
        if frame.empty:
            return
        con.register("_rows", frame)
        cols = ", ".join(f'"{c}"' for c in frame.columns)
        con.execute(f'INSERT INTO "{table}" ({cols}) SELECT {cols} FROM _rows')
        con.unregister("_rows")

    def execute(self, sql: str, params: list | dict | None = None) -> None:
        """One statement that returns nothing (an UPDATE)."""
        with self.connect() as con:
            con.execute(sql, params or [])

    def query(self, sql: str, params: list | dict | None = None, read_only: bool = False,
              sandboxed: bool = False) -> pd.DataFrame:
        with self.connect(read_only=read_only, sandboxed=sandboxed) as con:
            return con.execute(sql, params or []).df()

    def run_named_query(self, name: str, params: dict | None = None, read_only: bool = False,
                        sandboxed: bool = False) -> pd.DataFrame:
        """One of the canned queries, by name (never a path)."""
        return self.query(canned_query(name), params, read_only=read_only, sandboxed=sandboxed)

    def run_user_query(self, name: str, params: dict | None = None) -> pd.DataFrame:
        """A canned query a user asked for: on a sandboxed connection to an existing file,
        so it can neither write the database nor any other file, nor create a database."""
        sql = canned_query(name)
        if not self.path.is_file():
            raise LQLoRAInputError(
                f"there is no warehouse at {self.path} yet; `lqlora run` creates it (or set --home / LQLORA_HOME)"
            )
        return self.query(sql, params, sandboxed=True)


def canned_queries() -> dict[str, Path]:
    """The shipped queries by name: the only SQL a user can run by name."""
    return {p.stem: p for p in sorted((SQL_DIR / "queries").glob("*.sql")) if p.is_file()}


def canned_query(name: str) -> str:
    """The text of a canned query. The name is looked up among the shipped files, never
    joined onto a path, so `../schema` or an absolute path cannot reach another file."""
    known = canned_queries()
    if name not in known:
        raise LQLoRAInputError(f"unknown query {name!r}; known queries: {', '.join(known)}")
    return known[name].read_text()
