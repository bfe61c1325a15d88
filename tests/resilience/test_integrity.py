"""Artifact integrity: checksums recorded in DuckDB, damage detected on load, rebuilt
by re-materializing the owning asset, and a clear error downstream until then."""

import ast
import json
from pathlib import Path

import dagster as dg
import pytest
import torch
from safetensors.torch import save_file

from lqlora_dagster.definitions import build_definitions, resources_at
from lqlora_dagster.store.artifacts import ArtifactStore, DamagedArtifact
from lqlora_dagster.store.keys import file_sha256
from lqlora_dagster.store.ledger import ArtifactLedger
from lqlora_dagster.store.warehouse import Warehouse
from tests.conftest import registered_home
from tests.pipeline.conftest import tiny_run_config

MODEL = "tiny-llama"
REPO = Path(__file__).resolve().parents[2]


def run(home: Path, instance, *assets: str) -> dg.ExecuteInProcessResult:
    defs = build_definitions(home)
    return dg.materialize(
        list(defs.assets),
        instance=instance,
        partition_key=MODEL,
        resources=resources_at(home),
        run_config={"ops": {k: v for k, v in tiny_run_config(steps=2)["ops"].items() if k in assets}},
        selection=dg.AssetSelection.assets(*assets),
        raise_on_error=False,
    )


def failure_messages(result: dg.ExecuteInProcessResult) -> str:
    """Every step failure's message with its causes (what the UI shows for the step)."""
    out = []
    for event in result.get_step_failure_events():
        err = event.step_failure_data.error
        while err is not None:
            out.append(err.message)
            err = err.cause
    return "\n".join(out)


def run_logs(instance, result) -> list[str]:
    return [e.user_message for e in instance.all_logs(result.run_id) if e.user_message]


def sidecars(home: Path, asset: str) -> list[Path]:
    """The sidecar records (artifacts/<asset>/<partition>/<key>.json), not JSON inside folders."""
    return sorted((home / "artifacts" / asset).glob("*/*.json"))


def artifact_files(home: Path, asset: str) -> list[Path]:
    (side,) = sidecars(home, asset)
    target = side.parent / json.loads(side.read_text())["path"]
    return sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_llama_folder):
    """The graph up to the finetuned adapters, in a fresh home (one method, one budget)."""
    home = tmp_path_factory.mktemp("integrity-home")
    with registered_home(home, {MODEL: tiny_llama_folder}) as (w, instance):
        stages = (
            "base_model",
            "task_data",
            "calibration_batches",
            "fisher_diagonals",
            "error_table",
            "allocation_plan",
            "decomposed_model",
            "finetuned_adapters",
        )
        assert run(home, instance, *stages).success
        yield home, instance


def test_every_artifact_has_its_checksums_in_duckdb(built):
    home, _ = built
    ledger = ArtifactLedger(Warehouse(home / "lqlora.duckdb"))
    all_sidecars = sorted((home / "artifacts").glob("*/*/*.json"))
    assets = {p.relative_to(home / "artifacts").parts[0] for p in all_sidecars}
    assert {"calibration_batches", "fisher_diagonals", "decomposed_model", "finetuned_adapters"} <= assets
    for side in all_sidecars:
        record = json.loads(side.read_text())
        target = side.parent / record["path"]
        recorded = ledger.checksums(str(target.relative_to(home / "artifacts")))
        assert recorded == record["sha256"], side
        files = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
        assert {file_sha256(f) for f in files} == set(recorded.values())


def test_truncated_fisher_is_detected_and_rebuilt(built):
    home, instance = built
    (f,) = artifact_files(home, "fisher_diagonals")
    good = file_sha256(f)
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    result = run(home, instance, "fisher_diagonals")
    assert result.success
    logs = run_logs(instance, result)
    assert any("missing or altered" in m and "rebuilding it" in m for m in logs), logs
    assert file_sha256(f) == good  # rebuilt to the same bytes (the computation is deterministic)


def test_altered_decomposition_fails_downstream_by_name_then_rebuilds(built):
    home, instance = built
    target = max(artifact_files(home, "decomposed_model"), key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte deep inside the weights
    target.write_bytes(bytes(data))

    # only the asset downstream of the damage: it must stop and say what to re-materialize
    downstream = run(home, instance, "evaluation")
    assert not downstream.success
    message = failure_messages(downstream)
    assert "missing or altered" in message and "re-materialize asset 'decomposed_model'" in message, message

    rebuilt = run(home, instance, "decomposed_model")
    assert rebuilt.success
    assert any("rebuilding it" in m for m in run_logs(instance, rebuilt))
    assert run(home, instance, "evaluation").success


def test_file_and_sidecar_altered_together_are_caught_by_the_ledger(built):
    home, _ = built
    store = ArtifactStore(home / "artifacts", ArtifactLedger(Warehouse(home / "lqlora.duckdb")))
    (side,) = sidecars(home, "calibration_batches")
    key = side.stem
    art = store.get("calibration_batches", MODEL, key)
    # rewrite the data and make the sidecar agree with it, as a careless hand edit would
    tensors, meta = store.load_tensors(art)
    tensors["input_ids"][0, 0] += 1
    save_file(tensors, str(art.path), metadata=meta)
    record = json.loads(side.read_text())
    record["sha256"] = {art.path.name: file_sha256(art.path)}
    side.write_text(json.dumps(record))
    with pytest.raises(DamagedArtifact, match="disagrees with the checksums recorded in DuckDB"):
        store.get("calibration_batches", MODEL, key)
    assert store.find("calibration_batches", MODEL, key) is None  # so its stage rebuilds it


def test_unreadable_sidecar_names_the_asset(tmp_path):
    store = ArtifactStore(tmp_path)
    store.save_tensors("fisher_diagonals", "m", "k1", {"x": torch.ones(3)})
    (tmp_path / "fisher_diagonals" / "m" / "k1.json").write_text("{not json")
    with pytest.raises(DamagedArtifact, match="re-materialize asset 'fisher_diagonals' for partition 'm'"):
        store.get("fisher_diagonals", "m", "k1")


# --- no unsafe deserialization anywhere in the project ---

UNSAFE_MODULES = {"pickle", "cPickle", "dill", "shelve", "marshal", "joblib", "cloudpickle"}


def python_files() -> list[Path]:
    roots = ["lqlora_dagster", "assets", "resources", "tests", "bench"]
    return sorted(p for r in roots for p in (REPO / r).rglob("*.py"))


def unsafe_calls(source: str) -> list[str]:
    """Imports of pickle-like modules, and torch.load / torch.serialization.load calls
    that do not pass weights_only=True."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(node.module)
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if name.endswith(("torch.load", "serialization.load")):
                safe = any(
                    k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in node.keywords
                )
                if not safe:
                    found.append(f"{name}(...) line {node.lineno}")
    return found


def test_the_scan_catches_unsafe_loads():
    assert unsafe_calls("import pickle") == ["pickle"]
    assert unsafe_calls("from joblib import load") == ["joblib"]
    load = "torch." + "load"  # spelled apart so a text search of the project stays clean
    assert unsafe_calls(f"import torch\n{load}('x')") == [f"{load}(...) line 2"]
    assert unsafe_calls(f"import torch\n{load}('x', weights_only=False)") == [f"{load}(...) line 2"]
    assert unsafe_calls(f"import torch\n{load}('x', weights_only=True)") == []


def test_no_pickle_and_no_unsafe_torch_load_in_the_project():
    files = python_files()
    assert len(files) > 50
    offenders = {str(p.relative_to(REPO)): bad for p in files if (bad := unsafe_calls(p.read_text()))}
    assert offenders == {}
