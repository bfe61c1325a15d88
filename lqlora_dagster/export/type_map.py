"""The types a GGUF export chose, per layer and matrix: a heatmap of bits per weight
with each cell naming its llama.cpp type (what the UI shows for an exported file)."""

import io
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from lqlora_dagster.export.ggml_types import ggml_type  # noqa: E402

_BLOCK = re.compile(r"blk\.(\d+)\.(.+)\.weight")


def layer_grid(tensors: pd.DataFrame) -> pd.DataFrame:
    """Target tensors as a (layer x matrix) grid of type names."""
    rows = []
    for name, kind in zip(tensors["tensor"], tensors["type"]):
        match = _BLOCK.fullmatch(name)
        if match:
            rows.append({"layer": int(match[1]), "matrix": match[2], "type": kind})
    frame = pd.DataFrame(rows, columns=["layer", "matrix", "type"])
    return frame.pivot(index="layer", columns="matrix", values="type").sort_index()


def type_map_png(tensors: pd.DataFrame, title: str) -> bytes:
    grid = layer_grid(tensors[tensors["is_target"]])
    bits = grid.map(lambda t: ggml_type(t).bits_per_weight if isinstance(t, str) else float("nan"))
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(grid.columns), 0.8 + 0.28 * len(grid)))
    shown = ax.imshow(bits.to_numpy(dtype=float), aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(grid.columns)), grid.columns, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(grid)), grid.index, fontsize=7)
    ax.set_ylabel("layer")
    for (i, j), kind in pd.DataFrame(grid.to_numpy()).stack().items():
        ax.text(j, i, kind, ha="center", va="center", fontsize=6, color="white")
    fig.colorbar(shown, ax=ax, label="bits per weight")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=90)
    plt.close(fig)
    return out.getvalue()
