"""The error table: e[i, c] and storage s[i, c] for every target matrix i and candidate
config c, stored in DuckDB `quant_errors`, one table per `table_key` (`pipeline/error_table_refs.py`).

Two kinds of rows:
- exact: what the decomposition stage will realize for that config, bit for bit (a
  cold-start decomposition per config, `Init.exact_errors`);
- estimated: the fast path for the LQ init (`estimates.py`), mostly a little high.

Who writes which rows of `quant_errors` (all through `compute.compute_rows`):
- the `error_table` asset (its chunk steps, `pipeline/error_table_stage.compute_table_rows`) writes its own
  tables: estimated rows under a fast table's key, exact rows under an exact table's;
- the `allocation_plan` asset (plan confirmation, `error_table_stage.exact_rows`) writes exact rows
  under a fast table's `exact_key`, the key an exhaustive run of that table has.
"""
