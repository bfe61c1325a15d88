"""Stage `exported_model`: a finetuned model written where models run, and scored there.

gguf: one file for llama.cpp, each target matrix in the llama.cpp type an ILP chose
under the budget (`export/gguf_export.py`); hf: the merged weights deq(Q) + s·L1·L2 as a
plain transformers folder; peft: the dequantized base and the adapter. The export is
keyed by the adapter and the settings that shape the file, stored in the artifact store
and recorded in DuckDB (`exports`, and `export_tensors` for a GGUF). The check scores
the written artifact in its runtime on the run's held-out windows, beside the in-tool
model on the same windows (`evaluations`, stage `exported`).
"""

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from lqlora_dagster.data.selection import TaskData
from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.export.folders import unit_fisher, write_fisher_twin, write_merged
from lqlora_dagster.export.ggml_types import ggml_type
from lqlora_dagster.export.gguf_export import export_gguf
from lqlora_dagster.export.hf_to_gguf import check_convertible, converter_tree
from lqlora_dagster.models.loading import load_tokenizer
from lqlora_dagster.pipeline.base_model_stage import recorded_targets
from lqlora_dagster.pipeline.calibration import load_fisher
from lqlora_dagster.pipeline.context import StageContext
from lqlora_dagster.pipeline.export_check import check_export
from lqlora_dagster.pipeline.finetuning import ASSET as ADAPTERS
from lqlora_dagster.pipeline.finetuning import load_finetuned, pick_adapter
from lqlora_dagster.pipeline.handles import (
    AdapterRef,
    ExportHandle,
    FinetunedHandle,
    FisherHandle,
    ModelHandle,
)
from lqlora_dagster.pipeline.settings import ExportSettings
from lqlora_dagster.store.keys import stable_key
from lqlora_dagster.store.schemas import EXPORT_TENSORS, EXPORTS
from lqlora_dagster.surgery.injector import to_dense
from lqlora_dagster.surgery.peft_adapter import dequantized_base

EXPORT_VERSION = "1"
ASSET = "exported_model"
GGUF_FILE = "model.gguf"
_CHECK_ONLY = ("check", "check_len", "check_windows", "margin")  # scoring knobs: the file is the same


def check_export_settings(model: ModelHandle, architectures: list[str], s: ExportSettings,
                          target_cols: dict[str, int]) -> None:
    """What can be refused before any work: a classifier to llama.cpp, an architecture
    its converter does not know, targets no allowed type fits, a budget under the
    smallest mix."""
    if s.format != "gguf":
        return
    if model.task != "causal-lm":
        raise LQLoRAInputError(f"model {model.model!r} is a classifier; llama.cpp runs causal LMs. "
                               "Export it with --format hf or --format peft")
    check_convertible(architectures, converter_tree())
    allowed = [ggml_type(t) for t in s.types]
    cheapest_bits = 0.0
    total = 0
    for name, (rows, cols) in target_cols.items():
        fits = [t.bits_per_weight for t in allowed if t.fits(cols)]
        if not fits:
            raise LQLoRAInputError(
                f"none of the types {', '.join(s.types)} fits {name} (rows of {cols} weights); allow a type of "
                "blocks of 32 (Q8_0, Q5_0, Q4_0, IQ4_NL, ...)"
            )
        cheapest_bits += min(fits) * rows * cols
        total += rows * cols
    if s.max_size is None and s.bits + 1e-9 < cheapest_bits / total:
        raise LQLoRAInputError(
            f"--bits {s.bits:g} is below what the smallest allowed types take on these matrices "
            f"({cheapest_bits / total:.3f} bits per weight); raise --bits or allow smaller types (--types)"
        )


def export_key(ref: AdapterRef, fisher: FisherHandle | None, s: ExportSettings) -> str:
    shaping = {k: v for k, v in dataclasses.asdict(s).items() if k not in _CHECK_ONLY}
    return stable_key(ref.run_key, fisher.key if fisher is not None and s.format == "gguf" else None, shaping,
                      EXPORT_VERSION)


def _targets(ctx: StageContext, model: ModelHandle) -> dict[str, tuple[int, int]]:
    return {t.name: (t.rows, t.cols) for t in recorded_targets(ctx, model.model)}


def run_export(
    ctx: StageContext,
    model: ModelHandle,
    fisher: FisherHandle | None,
    finetuned: FinetunedHandle,
    data: TaskData,
    s: ExportSettings,
) -> ExportHandle:
    ref = pick_adapter(finetuned, s.method, s.budget)
    key = export_key(ref, fisher, s)
    found = ctx.store.find(ASSET, model.model, key)
    if found is None:
        found = _write(ctx, model, fisher, ref, key, s)
    handle = ExportHandle(model.model, key, s.format, str(_file(found.path, s.format)), found.nbytes, ref.method,
                          ref.budget, margin=s.margin)
    if s.check:
        handle = check_export(ctx, model, ref, handle, data, s)
    return handle


def _file(path: Path, fmt: str) -> Path:
    return Path(path) / GGUF_FILE if fmt == "gguf" else Path(path)


def _write(ctx, model, fisher, ref, key, s: ExportSettings):
    targets = _targets(ctx, model)
    config = json_config(model)
    check_export_settings(model, config.get("architectures") or [], s, targets)
    tokenizer = load_tokenizer(Path(model.folder))
    net = load_finetuned(ctx, model, ref).cpu()
    scratch = ctx.checkpoints.parent / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    record: dict = {"target_bits": None, "objective": None, "notes": None}
    tensors: list = []

    def write_into(folder: Path) -> None:
        if s.format == "hf":
            write_merged(to_dense(net, merge=True), tokenizer, folder, s.dtype)
        elif s.format == "peft":
            write_merged(dequantized_base(net), tokenizer, folder / "base", s.dtype)
            shutil.copytree(ctx.store.get(ADAPTERS, model.model, ref.run_key).path, folder / "adapter")
        else:
            with tempfile.TemporaryDirectory(dir=scratch, prefix="merged-") as tmp:
                merged = write_merged(to_dense(net, merge=True), tokenizer, Path(tmp) / "merged")
                weights = load_fisher(ctx, fisher) if fisher is not None else unit_fisher(targets)
                twin = write_fisher_twin(merged, {n: weights[n] for n in targets}, Path(tmp) / "fisher")
                plan, written = export_gguf(
                    merged, twin, folder / GGUF_FILE, tuple(ggml_type(t) for t in s.types), s.other_type, s.bits,
                    s.max_bytes, scratch, log=ctx.log,
                    progress=lambda what, done, total: ctx.progress(what, done, total, "tensors"),
                )
            errors = {(r.matrix, r.config): r.error for r in plan.table.itertuples()}
            record.update(target_bits=plan.target_bits, objective=plan.objective,
                          notes="; ".join(plan.notes) or None)
            tensors.extend(
                {"export_key": key, "tensor": w.name, "type": w.type, "numel": w.numel, "nbytes": w.nbytes,
                 "is_target": w.target, "error": errors.get((w.name, w.type)) if w.target else None}
                for w in written
            )

    art = ctx.store.save_folder(ASSET, model.model, key, write_into)
    row = {"export_key": key, "model": model.model, "method": ref.method, "budget": ref.budget,
           "plan_id": ref.plan_id, "run_key": ref.run_key, "format": s.format, "path": str(art.path),
           "file_bytes": art.nbytes, "sha256": json.dumps(art.sha256), **record}
    ctx.warehouse.upsert("exports", EXPORTS.validate(pd.DataFrame([row])), ["export_key"])
    if tensors:
        ctx.warehouse.replace_rows("export_tensors", EXPORT_TENSORS.validate(pd.DataFrame(tensors)),
                                   {"export_key": key})
    ctx.log(f"exported {ref.method}{'' if ref.budget is None else f' @ {ref.budget:g}'} as {s.format}: "
            f"{art.nbytes / 1e6:.1f} MB" + (f", {record['target_bits']:.3f} bits per target weight"
                                            if record["target_bits"] else ""))
    return art


def json_config(model: ModelHandle) -> dict:
    path = Path(model.folder) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}
