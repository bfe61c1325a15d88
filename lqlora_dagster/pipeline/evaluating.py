"""Stage `evaluation`: the task's metrics on the eval part of the run's data
(perplexity of text, perplexity of the responses of instructions, accuracy and
macro-F1 of labels) for the reference model, each decomposed model (before
finetuning) and each finetuned one (after), with storage in bits/param. Rows already
in DuckDB for the same inputs are reused."""

from pathlib import Path

import pandas as pd

from lqlora_dagster.data.selection import TaskData
from lqlora_dagster.memory import PeakMemory, release_freed_memory
from lqlora_dagster.metrics import storage
from lqlora_dagster.models.loading import load_tokenizer
from lqlora_dagster.pipeline.base_model_stage import load_base
from lqlora_dagster.pipeline.context import StageContext
from lqlora_dagster.pipeline.decomposition import ASSET as DECOMPOSED
from lqlora_dagster.pipeline.finetuning import label, load_finetuned, spread
from lqlora_dagster.pipeline.handles import DecomposedHandle, EvaluationHandle, FinetunedHandle, ModelHandle
from lqlora_dagster.pipeline.settings import EvalSettings
from lqlora_dagster.quant import fast_decode
from lqlora_dagster.store.keys import stable_key
from lqlora_dagster.store.schemas import EVALUATIONS
from lqlora_dagster.surgery.lq_model_io import load_lq_model
from lqlora_dagster.tasks import get_task, task_of_data

EVAL_VERSION = "3"  # 3: memory measured from a trimmed heap (release_freed_memory)


def _done(ctx: StageContext, key: str) -> bool:
    return not ctx.warehouse.query("SELECT 1 FROM evaluations WHERE eval_key = ?", [key]).empty


def run_evaluation(
    ctx: StageContext,
    model: ModelHandle,
    decomposed: DecomposedHandle,
    finetuned: FinetunedHandle,
    data: TaskData,
    s: EvalSettings,
) -> EvaluationHandle:
    task, kind = task_of_data(data.task), get_task(model.task)
    held_out = data.content_id("eval")
    jobs = []
    if kind.scores_reference:
        jobs.append(
            (stable_key(model.key, s, held_out, EVAL_VERSION), "reference", None, None,
             lambda: load_base(model, ctx.device))
        )
    for ref in decomposed.items:
        path = ctx.store.get(DECOMPOSED, model.model, ref.decomp_key).path
        jobs.append(
            (
                stable_key(ref.decomp_key, s, held_out, EVAL_VERSION),
                "before_finetune",
                ref,
                ref.plan_id,
                lambda p=path: kind.fit_head(load_lq_model(p, ctx.device), data.labels),
            )
        )
    for ref in finetuned.items:
        jobs.append(
            (
                stable_key(ref.run_key, s, held_out, EVAL_VERSION),
                "after_finetune",
                ref,
                ref.plan_id,
                lambda r=ref: load_finetuned(ctx, model, r, data.labels, ctx.device),
            )
        )
    examples = None
    keys = []
    if ctx.device.type == "cpu":
        fast_decode.kernel()  # its library loads once per process: no model's memory
    for key, stage, ref, plan_id, load in jobs:
        keys.append(key)
        if _done(ctx, key):
            if stage == "after_finetune" and ref.lr is not None:  # rows scored before `lr` was recorded
                ctx.warehouse.execute("UPDATE evaluations SET lr = ? WHERE eval_key = ? AND lr IS NULL", [ref.lr, key])
            continue
        if examples is None:
            encoded = task.examples(load_tokenizer(Path(model.folder)), data, "eval", s.seq_len)
            examples = spread(encoded.tensors, s.n_windows) if data.task == "lm" else encoded.tensors
            if encoded.truncated:
                ctx.log(f"evaluation: {encoded.truncated} held-out rows were longer than {s.seq_len} tokens and were "
                        "cut (--eval-len)")
        release_freed_memory()  # the same start for every model, whatever ran before it
        with PeakMemory(ctx.device) as memory:  # what loading and scoring this model added
            net = load()
            scores = task.score(net, examples, s.batch_size)
        metric, value = task.metric, scores[task.metric]
        ppl = value if metric.endswith("perplexity") else None
        compressed = ref is not None and ref.budget is not None
        st = storage(net) if compressed else None
        row = {
            "eval_key": key,
            "model": model.model,
            "method": ref.method if ref is not None else "reference",
            "budget": float(ref.budget) if compressed else None,
            "stage": stage,
            "metric": metric,
            "value": value,
            "perplexity": ppl,
            "bits_per_param": st.bits_per_param if st else None,
            "bits_incl_lowrank": st.bits_incl_lowrank if st else None,
            "peak_mb": memory.added_mb,
            "n_tokens": task.n_tokens(examples),
            "seq_len": s.seq_len,
            "plan_id": plan_id,
            "macro_f1": scores.get("macro_f1"),
            "dataset": "{} ({})".format(data.source("eval")[0].name, data.source("eval")[1]),
            "lr": ref.lr if stage == "after_finetune" else None,
        }
        ctx.warehouse.upsert("evaluations", EVALUATIONS.validate(pd.DataFrame([row])), ["eval_key"])
        what = "reference" if ref is None else f"{label(ref)} {stage}"
        ctx.log(f"evaluation {what}: {metric} {value:.4f}")
        del net
    return EvaluationHandle(model.model, keys)


def evaluation_table(ctx: StageContext, keys: list[str]) -> pd.DataFrame:
    """The evaluation rows with their plan's rank set and total size (NULL for the
    reference, and for plans stored before those existed)."""
    frame = ctx.warehouse.query(
        "SELECT e.method, e.budget, e.stage, e.metric, e.value, e.perplexity, e.macro_f1, e.bits_per_param, "
        "e.bits_incl_lowrank, e.lr, p.ranks AS plan_ranks, p.total_bytes "
        "FROM evaluations e LEFT JOIN plans p ON p.plan_id = e.plan_id "
        "WHERE e.eval_key IN (SELECT unnest(?::VARCHAR[])) "
        "ORDER BY e.stage <> 'reference', e.method, e.budget, e.stage DESC",
        [keys],
    )
    return frame
