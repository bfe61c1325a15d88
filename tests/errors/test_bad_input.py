"""Every mistake a user can make ends in a message that says what to do.

Each case runs the real entry point a user would hit (the `lqlora` CLI, a pipeline
stage on a real tiny model, the Dagster run config) and asserts the message. File
permission cases run in a forked child that drops root, since root ignores modes.
"""

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import dagster as dg
import pytest
import torch

from lqlora_dagster import cli
from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.pipeline.base_model_stage import run_base_model
from lqlora_dagster.pipeline.calibration import run_calibration
from lqlora_dagster.pipeline.context import StageContext
from lqlora_dagster.pipeline.error_table_stage import compute_table_rows, table_handle
from lqlora_dagster.pipeline.planning import run_planning
from lqlora_dagster.pipeline.registry import register_model
from lqlora_dagster.pipeline.settings import CalibrationSettings, ErrorTableSettings, PlanSettings
from lqlora_dagster.store.warehouse import Warehouse

# --- the CLI: exit code 2 and the message on stderr -------------------------------------


def run_cli(home: Path, *argv: str, capsys) -> tuple[int, str]:
    code = cli.main(["--home", str(home), *argv])
    return code, capsys.readouterr().err


@pytest.fixture()
def home(tmp_path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture()
def not_a_model(tmp_path) -> Path:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("not weights")
    return folder


CLI_CASES = {
    "unknown model path": (["register", "/no/such/model"], r"neither a bundled model .* nor an existing path"),
    "bad partition name": (["register", "smollm2-135m", "--name", "My Model!"], r"not a valid partition key"),
    "bad target regex": (["register", "smollm2-135m", "--pattern", "(q_proj"], r"not a valid regex"),
    "run unregistered model": (["run", "--model", "nope"], r"model 'nope' is not registered; run `lqlora register"),
    "negative budget": (["run", "--budget", "-1"], r"budget -1.0 is not a sensible number"),
    "absurd budget": (["run", "--budget", "500"], r"budget 500.0 is not a sensible number"),
    "NaN budget": (["run", "--budget", "nan"], r"budget nan is not a sensible number"),
    "zero rank": (["run", "--rank", "0"], r"rank must be an integer >= 1, got 0"),
    "one-token calibration windows": (["run", "--calibration-len", "1"], r"seq_len must be an integer >= 2, got 1"),
    "zero finetune steps": (["run", "--steps", "0"], r"steps must be an integer >= 1, got 0"),
    "zero eval windows": (["run", "--eval-windows", "0"], r"n_windows must be an integer >= 1, got 0"),
    "unknown canned query": (["sql", "best_everything"], r"unknown query 'best_everything'; known queries: .*error_vs_bits"),
    "unregister unknown model": (["unregister", "ghost"], r"model 'ghost' is not registered; `lqlora models` lists them"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_rejects(case, home, capsys):
    argv, message = CLI_CASES[case]
    code, err = run_cli(home, *argv, capsys=capsys)
    assert code == 2, err
    assert re.search(message, err), err
    assert "Traceback" not in err


def test_cli_folder_that_is_not_a_model(home, not_a_model, capsys):
    code, err = run_cli(home, "register", str(not_a_model), capsys=capsys)
    assert code == 2
    assert "is not a Hugging Face model folder: it needs config.json and *.safetensors" in err


def test_cli_file_instead_of_folder(home, not_a_model, capsys):
    code, err = run_cli(home, "register", str(not_a_model / "readme.txt"), capsys=capsys)
    assert code == 2 and "is not a Hugging Face model folder" in err


def test_cli_duplicate_registration(home, tiny_llama_folder, not_a_model, tmp_path, capsys):
    assert run_cli(home, "register", str(tiny_llama_folder), "--name", "tiny", capsys=capsys)[0] == 0
    # the same registration again is a no-op, not an error
    code, _ = run_cli(home, "register", str(tiny_llama_folder), "--name", "tiny", capsys=capsys)
    assert code == 0
    other = tmp_path / "other"
    shutil.copytree(tiny_llama_folder, other)
    code, err = run_cli(home, "register", str(other), "--name", "tiny", capsys=capsys)
    assert code == 2
    assert f"model 'tiny' is already registered from {tiny_llama_folder.resolve()}; pick another name" in err


def test_cli_unknown_flag_is_a_usage_error(home, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--home", str(home), "run", "--budgte", "3"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --budgte" in capsys.readouterr().err


def test_cli_unknown_method_lists_the_choices(home, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--home", str(home), "run", "--methods", "lqlora-fishr"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'lqlora-fishr'" in err and "lqlora-fisher" in err


def test_cli_home_is_a_file(tmp_path, capsys):
    path = tmp_path / "home-file"
    path.write_text("")
    code, err = run_cli(path, "models", capsys=capsys)
    assert code == 2
    assert f"LQLORA_HOME {path} is not a writable folder" in err


def test_cli_corrupted_duckdb(home, capsys):
    (home / "lqlora.duckdb").write_bytes(b"this is not a database" * 1000)
    code, err = run_cli(home, "models", capsys=capsys)
    assert code == 2
    assert "is not a readable DuckDB database" in err and "move it away and re-materialize" in err


# --- permissions: a child process without root's override --------------------------------


def as_unprivileged(fn) -> str:
    """Run `fn()` in a forked child with uid/gid nobody (when we are root) and return the
    message of the exception it raised (or 'no error')."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            fn()
            message = "no error"
        except BaseException as err:  # report anything, the parent asserts
            message = f"{type(err).__name__}: {err}"
        os.write(write, message.encode()[:60000])
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    return b"".join(chunks).decode()


@pytest.fixture()
def shared_dir():
    """A folder any user can enter (pytest's tmp_path sits under a root-only 0700 parent)."""
    path = Path(tempfile.mkdtemp(prefix="lqlora-perm-"))
    path.chmod(0o755)
    yield path
    for p in [path, *path.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    shutil.rmtree(path)


def test_read_only_duckdb_file(shared_dir):
    path = shared_dir / "lqlora.duckdb"
    Warehouse(path).init_schema()
    path.chmod(0o444)
    assert as_unprivileged(lambda: Warehouse(path).query("SELECT 1", read_only=True)) == "no error"
    message = as_unprivileged(lambda: Warehouse(path, lock_timeout_s=1).init_schema())
    assert f"cannot write the warehouse {path}: permission denied; point LQLORA_HOME at a writable folder" in message


def test_read_only_duckdb_file_still_answers_queries(shared_dir):
    path = shared_dir / "lqlora.duckdb"
    Warehouse(path).init_schema()
    path.chmod(0o444)

    def query():
        rows = Warehouse(path, lock_timeout_s=1).query("SELECT count(*) AS n FROM models", read_only=True)
        raise SystemExit(f"rows={int(rows['n'].iloc[0])}")

    assert as_unprivileged(query) == "SystemExit: rows=0"


def test_home_not_writable(shared_dir):
    locked = shared_dir / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    from lqlora_dagster.pipeline.context import ensure_writable_home

    message = as_unprivileged(lambda: ensure_writable_home(locked / "home"))
    assert f"LQLORA_HOME {locked / 'home'} is not a writable folder" in message
    assert "Permission denied" in message


# --- the pipeline stages on a real tiny model ---------------------------------------------


@pytest.fixture()
def ctx(home) -> StageContext:
    return StageContext.at(home, log=lambda _m: None)


def save_llama(folder: Path, poison: float | None = None, seed: int = 0) -> Path:
    from tests.tiny_models import tiny_llama

    model = tiny_llama(seed)
    if poison is not None:
        with torch.no_grad():
            model.model.layers[1].mlp.up_proj.weight[3, 5] = poison
            model.model.layers[1].mlp.up_proj.weight[7, 1] = poison
    model.save_pretrained(folder)
    return folder


def test_unknown_partition(ctx):
    with pytest.raises(LQLoRAInputError, match=r"unknown model partition 'nope' \(registered: none yet\); register it"):
        run_base_model(ctx, "nope")


@pytest.mark.parametrize("value,counts", [(float("nan"), "2 NaN and 0 Inf"), (float("inf"), "0 NaN and 2 Inf")])
def test_non_finite_weights(ctx, tmp_path, value, counts):
    register_model(ctx.warehouse, "poisoned", str(save_llama(tmp_path / "poisoned", poison=value)))
    with pytest.raises(LQLoRAInputError) as err:
        run_base_model(ctx, "poisoned")
    assert f"model 'poisoned': weight of model.layers.1.mlp.up_proj has {counts} values" in str(err.value)
    assert "the checkpoint is corrupt" in str(err.value)


def test_unsupported_architecture(ctx, tmp_path):
    folder = save_llama(tmp_path / "alien")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="alien-net", architectures=["AlienForCausalLM"])
    (folder / "config.json").write_text(json.dumps(config))
    register_model(ctx.warehouse, "alien", str(folder))
    with pytest.raises(LQLoRAInputError, match=r"cannot load a causal-lm model from .*alien.*alien-net"):
        run_base_model(ctx, "alien")


def test_config_json_not_json(ctx, tmp_path):
    folder = save_llama(tmp_path / "broken")
    (folder / "config.json").write_text("{ not json")
    with pytest.raises(LQLoRAInputError, match=r"config.json is not valid JSON"):
        register_model(ctx.warehouse, "broken", str(folder))


def test_pattern_matching_nothing(ctx, tmp_path):
    register_model(ctx.warehouse, "tiny", str(save_llama(tmp_path / "m")), pattern=r"attention\.query$")
    with pytest.raises(LQLoRAInputError, match=r"target pattern 'attention\\\\.query\$' matches no module of this LlamaForCausalLM"):
        run_base_model(ctx, "tiny")


def test_pattern_matching_a_non_linear(ctx, tmp_path):
    register_model(ctx.warehouse, "tiny", str(save_llama(tmp_path / "m")), pattern=r"input_layernorm$")
    with pytest.raises(LQLoRAInputError, match=r"is a LlamaRMSNorm, which cannot be wrapped; .* Narrow the pattern"):
        run_base_model(ctx, "tiny")


@pytest.fixture()
def tiny_base(ctx, tiny_llama_folder):
    register_model(ctx.warehouse, "tiny", str(tiny_llama_folder))
    return run_base_model(ctx, "tiny")


def run_error_table(ctx, model, fisher, settings):
    compute_table_rows(ctx, model, fisher, settings)
    return table_handle(model, fisher, settings)


def test_rank_too_large_for_the_model(ctx, tiny_base):
    settings = ErrorTableSettings(methods=("lqlora",), rank=40, grid="reduced")
    with pytest.raises(LQLoRAInputError) as err:
        run_error_table(ctx, tiny_base, None, settings)
    assert (
        "rank 40 is too large for model 'tiny': its thinnest target, model.layers.0.self_attn.k_proj (32x64), "
        "allows at most rank 31" in str(err.value)
    )


def test_budget_below_the_cheapest_plan(ctx, tiny_base):
    tables = run_error_table(ctx, tiny_base, None, ErrorTableSettings(methods=("qlora-ilp",), grid="reduced"))
    with pytest.raises(LQLoRAInputError) as err:
        run_planning(ctx, tables, PlanSettings(budgets=(1.5,)), tiny_base)
    # every matrix at its cheapest reduced-grid config, its 32-bit header counted
    assert "budget 1.5 bits/param is below the cheapest plan, 2.0625" in str(err.value)
    assert "raise the budget to at least 2.063" in str(err.value)


def test_fisher_method_without_fisher(ctx, tiny_base):
    with pytest.raises(LQLoRAInputError, match="method 'lqlora-fisher' needs Fisher diagonals, but none were computed"):
        run_error_table(ctx, tiny_base, None, ErrorTableSettings(methods=("lqlora-fisher",), grid="reduced"))


def test_more_calibration_windows_than_text(ctx, tiny_base, tmp_path):
    from lqlora_dagster.pipeline.dataset_registry import add_dataset, select_data
    from lqlora_dagster.pipeline.settings import DataSettings

    path = tmp_path / "calibration.txt"
    path.write_text("The state of our union is strong. " * 40)
    add_dataset(ctx.warehouse, "short", str(path))
    data = select_data(ctx.warehouse, tiny_base, DataSettings(train="short"))
    with pytest.raises(LQLoRAInputError, match=r"500 calibration sequences asked, the calibration data \(short, calibration\) holds \d+"):
        run_calibration(ctx, tiny_base, data, CalibrationSettings(n_sequences=500, seq_len=64))


# --- Dagster run config: typos caught before anything runs ---------------------------------


def _materialize_with(home: Path, ops: dict):
    from lqlora_dagster.definitions import build_definitions, resources_at

    defs = build_definitions(home)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("base_models", ["tiny"])
        return dg.materialize(
            list(defs.assets),
            instance=instance,
            partition_key="tiny",
            resources=resources_at(home),
            run_config={"ops": ops},
            raise_on_error=False,  # config is checked before any step; nothing is registered
        )


def test_config_unknown_field(home):
    with pytest.raises(dg.DagsterInvalidConfigError) as err:
        _materialize_with(home, {"error_table": {"config": {"rnak": 16}}})
    assert 'Received unexpected config entry "rnak" at path root:ops:error_table:config' in str(err.value)


def test_config_wrong_type(home):
    with pytest.raises(dg.DagsterInvalidConfigError) as err:
        _materialize_with(home, {"allocation_plan": {"config": {"budgets": "3.0"}}})
    assert 'Value at path root:ops:allocation_plan:config:budgets must be list. Expected: "[Float]"' in str(
        err.value
    )


def test_config_unknown_grid(home):
    with pytest.raises(dg.DagsterInvalidConfigError) as err:
        _materialize_with(home, {"error_table": {"config": {"grid": "huge"}}})
    assert "root:ops:error_table:config:grid not in enum type Literal['full', 'reduced'] got huge" in str(err.value)


def test_config_misspelled_method():
    from assets.error_table import ErrorTableConfig

    with pytest.raises(LQLoRAInputError) as err:
        ErrorTableConfig(methods=["lqlora-fishr"]).settings()
    assert "unknown methods ['lqlora-fishr']; choose from qlora, loftq" in str(err.value)
