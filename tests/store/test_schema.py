"""The warehouse's tables are described twice: the DDL (sql/schema.sql and the migrations,
applied by Warehouse.init_schema) and the pandera schemas the stages validate their frames
with. The row dicts the stages build are held to the pandera columns (every schema is
strict), so these tests prove the three agree: same columns, compatible types, the same
nullability and keys, and every write to a pandera-described table validated first."""

import ast
import re
from pathlib import Path

import duckdb
import pandera.pandas as pa
import pytest

from lqlora_dagster.store import schemas
from lqlora_dagster.store.warehouse import Warehouse, migrations

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = {s.name: s for s in vars(schemas).values() if isinstance(s, pa.DataFrameSchema)}
# the DuckDB types a pandera dtype may be stored in
COMPATIBLE = {
    "str": {"VARCHAR"},
    "int64": {"INTEGER", "BIGINT"},
    "Int64": {"INTEGER", "BIGINT"},  # pandas' nullable integer
    "float64": {"DOUBLE"},
    "bool": {"BOOLEAN"},
}
WRITES = {"replace_rows", "upsert"}
RAW_WRITE = re.compile(r"(?:INSERT\s+(?:OR\s+\w+\s+)?INTO|UPDATE|COPY)\s+\"?(\w+)", re.IGNORECASE)
ADDED_COLUMN = re.compile(r"ALTER TABLE (\w+) ADD COLUMN IF NOT EXISTS (\w+)", re.IGNORECASE)


@pytest.fixture(scope="module")
def ddl(tmp_path_factory) -> dict[str, dict[str, dict]]:
    """{table: {column: {type, nullable, default, key}}} of a fresh home, read back from DuckDB."""
    path = tmp_path_factory.mktemp("home") / "lqlora.duckdb"
    Warehouse(path).init_schema()
    with duckdb.connect(str(path), read_only=True) as con:
        columns = con.execute(
            "SELECT table_name, column_name, data_type, is_nullable, column_default FROM information_schema.columns"
        ).fetchall()
        keys = con.execute(
            "SELECT table_name, constraint_column_names FROM duckdb_constraints() WHERE constraint_type = 'PRIMARY KEY'"
        ).fetchall()
    tables: dict[str, dict[str, dict]] = {}
    for table, column, kind, nullable, default in columns:
        tables.setdefault(table, {})[column] = {"type": kind, "nullable": nullable == "YES", "default": default}
    for table, names in keys:
        for name in names:
            tables[table][name]["key"] = True
    return tables


def migrated_columns() -> set[tuple[str, str]]:
    """(table, column) of every column a migration adds to a table that older homes hold."""
    return {
        (table.lower(), column.lower())
        for m in migrations()
        for table, column in ADDED_COLUMN.findall(m.path.read_text())
    }


def test_every_pandera_schema_names_a_table(ddl):
    assert None not in SCHEMAS, "a pandera schema in store/schemas.py has no name= (its DuckDB table)"
    assert set(SCHEMAS) == {"matrices", "quant_errors", "plans", "plan_assignments", "train_steps", "evaluations",
                            "exports", "export_tensors"}
    assert set(SCHEMAS) <= set(ddl), f"pandera schemas for tables the DDL lacks: {set(SCHEMAS) - set(ddl)}"


@pytest.mark.parametrize("table", sorted(SCHEMAS))
def test_every_pandera_column_is_a_ddl_column_of_a_compatible_type(ddl, table):
    columns = ddl[table]
    for name, column in SCHEMAS[table].columns.items():
        assert name in columns, f"{table}.{name} is in the pandera schema but not in sql/schema.sql"
        dtype = str(column.dtype)
        assert columns[name]["type"] in COMPATIBLE[dtype], (
            f"{table}.{name}: pandera {dtype}, DuckDB {columns[name]['type']} (fits {sorted(COMPATIBLE[dtype])})"
        )


@pytest.mark.parametrize("table", sorted(SCHEMAS))
def test_pandera_and_ddl_agree_on_nullability(ddl, table):
    """pandera non-nullable <=> NOT NULL (or PRIMARY KEY) in DuckDB. The one exception:
    a column a migration added (plans.budget_kind, ranks, factor_bits, bits_with_lowrank,
    total_bytes; plan_assignments.rank) stays nullable in the DDL, because the rows an
    older home already holds have no value for it, while new rows must carry one."""
    added = migrated_columns()
    for name, column in SCHEMAS[table].columns.items():
        stored = ddl[table][name]["nullable"]
        if column.nullable:
            assert stored, f"{table}.{name} may be null in pandera but is NOT NULL in sql/schema.sql"
        elif stored:
            assert (table, name) in added, (
                f"{table}.{name} is required by pandera but may be null in sql/schema.sql; "
                "add NOT NULL there, or nullable=True in store/schemas.py"
            )


@pytest.mark.parametrize("table", sorted(SCHEMAS))
def test_ddl_columns_pandera_leaves_out_fill_themselves(ddl, table):
    """Every schema is strict, so a frame carries exactly the pandera columns; the DDL's
    others (created_at) must be filled by a default or may stay null."""
    schema = SCHEMAS[table]
    assert schema.strict is True, f"{table}: pandera schema must be strict=True, so the row dicts match it"
    for name, column in ddl[table].items():
        if name not in schema.columns:
            assert column["nullable"] or column["default"] is not None, (
                f"{table}.{name} is NOT NULL without a default, but the pandera schema leaves it out"
            )


@pytest.mark.parametrize("table", sorted(SCHEMAS))
def test_pandera_uniqueness_is_the_primary_key(ddl, table):
    schema = SCHEMAS[table]
    unique = set(schema.unique or []) | {n for n, c in schema.columns.items() if c.unique}
    key = {n for n, c in ddl[table].items() if c.get("key")}
    assert unique == key, f"{table}: pandera unique {sorted(unique)}, primary key {sorted(key)}"


# --- every write to a pandera table is validated -------------------------------------------


def _validated_by(expr: ast.expr, scope: ast.AST, module: ast.Module, imported: dict[str, str]) -> str | None:
    """The table whose pandera schema validates `expr` (SCHEMA.validate(...)), following a
    local name to its assignment and a call of a module-level function to its returns."""
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) and expr.func.attr == "validate":
        owner = expr.func.value
        if isinstance(owner, ast.Name) and owner.id in imported:
            return getattr(schemas, imported[owner.id]).name
        return None
    if isinstance(expr, ast.Name):
        found = {_resolve_assigned(expr.id, node, scope, module, imported) for node in ast.walk(scope)
                 if isinstance(node, ast.Assign)} - {"-"}
        return found.pop() if len(found) == 1 else None
    return None


def _resolve_assigned(name: str, node: ast.Assign, scope, module, imported) -> str | None:
    """'-' when `node` does not assign `name`."""
    for target in node.targets:
        if isinstance(target, ast.Name) and target.id == name:
            return _validated_by(node.value, scope, module, imported)
        if isinstance(target, ast.Tuple):
            names = [t.id if isinstance(t, ast.Name) else None for t in target.elts]
            if name in names:
                return _returned(node.value, names.index(name), module, imported)
    return "-"


def _returned(call: ast.expr, index: int, module: ast.Module, imported) -> str | None:
    """The table validating element `index` of what a module-level function returns."""
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):
        return None
    functions = [f for f in module.body if isinstance(f, ast.FunctionDef) and f.name == call.func.id]
    if len(functions) != 1:
        return None
    returns = [r.value for r in ast.walk(functions[0]) if isinstance(r, ast.Return)]
    found = {
        _validated_by(r.elts[index], functions[0], module, imported) if isinstance(r, ast.Tuple) else None
        for r in returns
    }
    return found.pop() if len(found) == 1 else None


def pandera_writes() -> list[tuple[str, int, str, str | None]]:
    """(file, line, table, table of the validating schema) of each replace_rows / upsert
    call on a pandera-described table in the package and its Dagster layer."""
    found = []
    for folder in ("lqlora_dagster", "assets", "resources"):
        for path in sorted((REPO / folder).rglob("*.py")):
            module = ast.parse(path.read_text())
            imported = {a.asname or a.name: a.name for n in ast.walk(module) if isinstance(n, ast.ImportFrom)
                        and n.module == "lqlora_dagster.store.schemas" for a in n.names}
            scopes = [n for n in ast.walk(module) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
            for scope in scopes:
                for call in ast.walk(scope):
                    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                            and call.func.attr in WRITES and len(call.args) >= 2):
                        continue
                    where = f"{path.relative_to(REPO)}:{call.lineno}"
                    table = call.args[0]
                    assert isinstance(table, ast.Constant), f"{where}: name the table as a literal string"
                    if table.value in SCHEMAS:
                        found.append((where, table.value, _validated_by(call.args[1], scope, module, imported)))
    return found


def test_every_write_to_a_pandera_table_is_validated_by_its_schema():
    writes = pandera_writes()
    assert {table for _, table, _ in writes} == set(SCHEMAS), "a pandera schema that no stage writes with"
    for where, table, validated in writes:
        assert validated == table, (
            f"{where} writes {table} with a frame that "
            + (f"the {validated} schema validated" if validated else "no pandera schema visibly validated")
            + f"; pass it through store.schemas' {table.upper()}.validate(...) first"
        )


# raw SQL writes to a pandera table that are known and why they need no frame check
RAW_WRITES_ALLOWED = {
    # back-fills one column on rows scored before `lr` was recorded, with the learning rate
    # of the adapter that was scored (the same value a new row carries)
    ("lqlora_dagster/pipeline/evaluating.py", "UPDATE evaluations SET lr = ? WHERE eval_key = ? AND lr IS NULL"),
}


def test_no_raw_sql_bypasses_the_pandera_tables():
    """Only replace_rows / upsert (checked above) write a pandera-described table, apart
    from the statements listed in RAW_WRITES_ALLOWED."""
    raw = {
        (path.relative_to(REPO).as_posix(), node.value)
        for folder in ("lqlora_dagster", "assets", "resources")
        for path in sorted((REPO / folder).rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        and set(RAW_WRITE.findall(node.value)) & set(SCHEMAS)
    }
    assert raw - RAW_WRITES_ALLOWED == set(), "SQL that writes a pandera table without its schema"


def test_a_write_that_skips_validation_is_found(tmp_path):
    """The scan is no rubber stamp: a frame written straight, or checked by another table's
    schema, is seen as such."""
    source = (
        "from lqlora_dagster.store.schemas import PLANS, TRAIN_STEPS\n"
        "def head():\n    return PLANS.validate(1), TRAIN_STEPS.validate(2)\n"
        "def run(ctx, frame):\n"
        "    a, b = head()\n"
        "    ctx.warehouse.upsert('plans', a, ['plan_id'])\n"
        "    ctx.warehouse.upsert('plan_assignments', b, ['plan_id'])\n"
        "    ctx.warehouse.upsert('train_steps', frame, ['run'])\n"
    )
    module = ast.parse(source)
    imported = {"PLANS": "PLANS", "TRAIN_STEPS": "TRAIN_STEPS"}
    run = module.body[2]
    calls = [c for c in ast.walk(run) if isinstance(c, ast.Call) and getattr(c.func, "attr", "") == "upsert"]
    seen = [_validated_by(c.args[1], run, module, imported) for c in calls]
    assert seen == ["plans", "train_steps", None]
