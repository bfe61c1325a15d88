"""The comparison report: one markdown table and two PNG plots from DuckDB rows.

Users pick a method by its numbers, so the table puts every method and budget on one
line with both bit counts (the quantized part alone, and with the 16-bit low-rank
factors) next to perplexity (a classifier: accuracy) before and after finetuning; the
Pareto plot shows that metric against total memory; the heatmaps show where one ILP
plan spent its bits (and, when it chose ranks, which rank each matrix got). A plan
that chose ranks is labelled by how (`rank_variants`) wherever one run holds several.
"""

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import rcParams
from matplotlib.figure import Figure  # no pyplot: files only, no display, no global state

from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.methods import METHODS, method_label


def rank_variants(evals: pd.DataFrame) -> pd.Series:
    """How a row's plan chose ranks, where a run has several kinds for one method:
    'ranks 0,8,16 allocated' or 'rank 16'; '' otherwise (one rank for all, as usual).
    A plan stored before plans recorded their ranks (NULL) is one rank for all: it is
    no kind of its own."""
    if "plan_ranks" not in evals.columns:
        return pd.Series("", index=evals.index)
    ranks = evals["plan_ranks"].fillna("").astype(str)
    kinds = ranks.where(ranks != "").groupby(evals["method"]).transform("nunique")
    return pd.Series(
        [
            "" if not r or (n < 2 and "," not in r) else f"ranks {r} allocated" if "," in r else f"rank {r}"
            for r, n in zip(ranks, kinds)
        ],
        index=evals.index,
    )


def comparison_frame(evals: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, rank variant, budget): the metric before/after finetuning
    and the bits.

    `evals` has the columns of DuckDB `evaluations` (method, budget, stage, metric,
    value, bits_per_param, bits_incl_lowrank) and optionally the plan's `plan_ranks`
    and `total_bytes`; `frame.attrs["metric"]` names the metric."""
    if evals.empty:
        raise LQLoRAInputError("no evaluations to report; materialize `evaluation` first")
    metrics = set(evals["metric"])
    if len(metrics) != 1:
        raise LQLoRAInputError(f"one metric per report, got {sorted(metrics)}")
    ref = evals[evals["stage"] == "reference"]
    ref_tuned = evals[(evals["method"] == "reference") & (evals["stage"] == "after_finetune")]
    rest = evals[(evals["stage"] != "reference") & (evals["method"] != "reference")]
    rest = rest.assign(variant=rank_variants(rest))
    if "total_bytes" not in rest.columns:
        rest = rest.assign(total_bytes=np.nan)
    keys = ["method", "variant", "budget"]
    wide = rest.pivot_table(index=keys, columns="stage", values="value", aggfunc="last").reindex(
        columns=["before_finetune", "after_finetune"]
    )
    bits = rest.groupby(keys)[["bits_per_param", "bits_incl_lowrank", "total_bytes"]].last()
    if "lr" not in rest.columns:
        rest = rest.assign(lr=np.nan)
    lrs = rest.assign(lr=rest["lr"].where(rest["stage"] == "after_finetune")).groupby(keys)["lr"].last()
    frame = wide.join(bits).join(lrs).reset_index()
    frame["label"] = [
        method_label(m, q) + (f", {v}" if v else "")
        for m, q, v in zip(frame["method"], frame["bits_per_param"], frame["variant"])
    ]
    order = {m: i for i, m in enumerate(METHODS)}
    frame["_order"] = frame["method"].map(order).fillna(len(order))
    frame = frame.sort_values(["budget", "_order", "variant"]).drop(columns="_order").reset_index(drop=True)
    if not ref.empty or not ref_tuned.empty:
        top = pd.DataFrame(
            [
                {
                    "method": "reference",
                    "budget": np.nan,
                    "before_finetune": float(ref["value"].iloc[-1]) if not ref.empty else np.nan,
                    # the fair upper line: the uncompressed model with the same LoRA finetuning
                    "after_finetune": float(ref_tuned["value"].iloc[-1]) if not ref_tuned.empty else np.nan,
                    "bits_per_param": 32.0,
                    "bits_incl_lowrank": 32.0,
                    "total_bytes": np.nan,
                    "lr": _last(ref_tuned, "lr"),
                    "variant": "",
                    "label": method_label("reference"),
                }
            ]
        )
        frame = pd.concat([top, frame], ignore_index=True)
    frame.attrs["metric"] = metrics.pop()
    return frame


def _last(rows: pd.DataFrame, column: str) -> float:
    return float(rows[column].iloc[-1]) if column in rows.columns and not rows.empty else np.nan


def markdown_table(frame: pd.DataFrame) -> str:
    """The report's table; 'MB in all' when plans recorded sizes, 'lr kept' when the
    learning rate was chosen per adapter (more than one rate among the rows)."""
    def num(v, fmt):
        return "" if pd.isna(v) else format(v, fmt)

    metric = frame.attrs.get("metric", "perplexity")
    sizes = "total_bytes" in frame.columns and frame["total_bytes"].notna().any()
    rates = "lr" in frame.columns and frame["lr"].dropna().nunique() > 1
    lines = [
        f"| method | budget | bits/param (Q) | bits/param incl. low rank |{' MB in all |' if sizes else ''} "
        f"{metric} before finetune | after finetune |{' lr kept |' if rates else ''}",
        "|---|---|---|---|" + ("---|" if sizes else "") + "---|---|" + ("---|" if rates else ""),
    ]
    fmt = ".2f" if metric == "perplexity" else ".3f"
    for r in frame.itertuples():
        size = f" {num(r.total_bytes / 1e6, '.2f')} |" if sizes else ""
        rate = f" {num(r.lr, 'g')} |" if rates else ""
        lines.append(
            f"| {r.label} | {num(r.budget, 'g')} | {num(r.bits_per_param, '.3f')} | "
            f"{num(r.bits_incl_lowrank, '.3f')} |{size} {num(r.before_finetune, fmt)} | "
            f"{num(r.after_finetune, fmt)} |{rate}"
        )
    return "\n".join(lines)


def save_png(fig: Figure, path: Path) -> Path:
    fig.savefig(path, format="png")
    return path


def pareto_figure(frame: pd.DataFrame, title: str = "") -> Figure:
    """Perplexity vs total bits/param (incl. the low-rank part), one line per method;
    hollow markers before finetuning, filled after."""
    rows = frame[frame["method"] != "reference"]
    if rows.empty:
        raise LQLoRAInputError("nothing to plot: no method rows")
    fig = Figure(figsize=(7.5, 4.8), dpi=110)
    ax = fig.subplots()
    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    variant = rows["variant"] if "variant" in rows.columns else pd.Series("", index=rows.index)
    for i, ((method, kind), g) in enumerate(rows.groupby([rows["method"], variant], sort=False)):
        g = g.sort_values("bits_incl_lowrank")
        c = colors[i % len(colors)]
        label = method_label(method) + (f", {kind}" if kind else "")
        ax.plot(
            g["bits_incl_lowrank"], g["before_finetune"], "o--", color=c, mfc="none", label=f"{label}, before"
        )
        after = g.dropna(subset=["after_finetune"])
        if not after.empty:
            ax.plot(
                after["bits_incl_lowrank"], after["after_finetune"], "o-", color=c, label=f"{label}, after"
            )
    ref = frame[frame["method"] == "reference"]
    if not ref.empty:
        ax.axhline(
            float(ref["before_finetune"].iloc[0]), color="black", lw=0.8, ls=":", label="fp32 reference"
        )
    ax.set_xlabel("bits per parameter, including the 16-bit low-rank part")
    metric = frame.attrs.get("metric", "perplexity")
    if metric == "perplexity":
        ax.set_ylabel("perplexity (held-out speeches)")
        ax.set_yscale("log")
    else:
        ax.set_ylabel(f"{metric} (held-out test set)")
    ax.set_title(title or f"{metric} vs memory")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def matrix_role(name: str) -> str:
    """A target's name within its layer: 'mlp.down_proj', 'attention.output.dense'
    (BERT has three matrices of kind 'dense' per layer; this keeps them apart)."""
    parts = name.split(".")
    index = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    return ".".join(parts[index + 1 :]) if index is not None else name


def allocation_grid(assignments: pd.DataFrame, value: str = "bits_per_param") -> pd.DataFrame:
    """`value` (bits/param, or rank) per (layer, matrix) of one plan, from rows (layer,
    matrix, position, value); columns in the model's order of modules."""
    if assignments.empty:
        raise LQLoRAInputError("the plan has no assignments to draw")
    rows = assignments.assign(role=assignments["matrix"].map(matrix_role))
    grid = rows.pivot_table(index="layer", columns="role", values=value, aggfunc="mean")
    order = rows.groupby("role")["position"].min().sort_values().index
    return grid[list(order)].sort_index()


def heatmap_figure(grid: pd.DataFrame, title: str = "", label: str = "bits per parameter") -> Figure:
    fig = Figure(figsize=(6.5, max(3.0, 0.22 * len(grid) + 1.5)), dpi=110)
    ax = fig.subplots()
    image = ax.imshow(grid.to_numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(grid.shape[1]), list(grid.columns), rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(grid.shape[0]), [str(i) for i in grid.index], fontsize=7)
    ax.set_xlabel("matrix type")
    ax.set_ylabel("layer")
    ax.set_title(title or "bits/param per matrix")
    fig.colorbar(image, ax=ax, label=label)
    fig.tight_layout()
    return fig
