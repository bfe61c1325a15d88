"""Tables as a person reads them in a terminal: blanks instead of NaN/None, no
bookkeeping timestamps unless asked, a sentence instead of an empty frame."""

import pandas as pd

TIMESTAMP_COLUMNS = ("created_at", "updated_at", "started_at", "finished_at")


def _cell(value) -> str:
    if value is None or (not isinstance(value, (list, tuple, dict)) and pd.isna(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def text_table(frame: pd.DataFrame, empty: str = "(no rows)", timestamps: bool = False) -> str:
    """Left-aligned text columns, right-aligned numbers; `empty` when there are no rows."""
    if frame.empty:
        return empty
    if not timestamps:
        frame = frame.drop(columns=[c for c in TIMESTAMP_COLUMNS if c in frame.columns])
    cells = [[_cell(v) for v in row] for row in frame.itertuples(index=False)]
    header = [str(c) for c in frame.columns]
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]

    def line(values: list[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(header)] + [line(r) for r in cells])
