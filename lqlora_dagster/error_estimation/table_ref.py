"""`TableRef`: what names one error table, so the row computation (this package) and
the pipeline's stages speak of the same table without the method code importing them."""

from dataclasses import dataclass


@dataclass(frozen=True)
class TableRef:
    method: str
    table_key: str
    rank: int  # 0 for methods without a low-rank init
    fisher_key: str | None
    configs: list[str]  # the candidate configs evaluated for this method
    n_rows: int
    # for an estimated (fast) table: the key of the exhaustive table whose rows it
    # estimates (where plan confirmation stores the exact rows it computes); else None
    exact_key: str | None = None
    # another rank of a multi-rank fast table: the rank whose factors its rows are
    # priced on (truncated for a lower rank, one step up for a higher one); None when
    # its rows come from decompositions at its own rank
    priced_on_rank: int | None = None
