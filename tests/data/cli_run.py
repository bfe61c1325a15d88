"""`lqlora` in this process for the data tests: its exit code and output, and what the
registry holds afterwards."""

import io
import os
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from lqlora_dagster.cli import main
from lqlora_dagster.store.warehouse import Warehouse


def lqlora(home: Path, *args: str) -> tuple[int, str, str]:
    """(rc, stdout, stderr) of `lqlora --home HOME ARGS...`, in this process."""
    out, err, before = io.StringIO(), io.StringIO(), os.environ.get("LQLORA_HOME")
    try:
        with redirect_stdout(out), redirect_stderr(err):
            rc = main(["--home", str(home), *map(str, args)])
    finally:  # main points LQLORA_HOME at the home; later tests must not inherit it
        os.environ.pop("LQLORA_HOME", None) if before is None else os.environ.update(LQLORA_HOME=before)
    return rc, out.getvalue(), err.getvalue()


def refused(home: Path, *args: str) -> str:
    rc, _, err = lqlora(home, *args)
    assert rc == 2 and err.startswith("error: ") and "Traceback" not in err, (rc, err)
    return err


def stored(home: Path) -> list[str]:
    """The registered dataset names (one read-only connection: the CLI made the schema)."""
    names = Warehouse(home / "lqlora.duckdb").query("SELECT name FROM datasets ORDER BY name", read_only=True)
    return names["name"].tolist()
