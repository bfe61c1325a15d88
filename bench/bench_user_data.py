"""What a run on a user's dataset produced, read back from its DuckDB: the dataset, the
validation curve of every adapter (the uncompressed model's LoRA, the reference, next
to each compressed method) and the held-out metrics before and after finetuning.

    python bench/bench_user_data.py --home HOME [--model smollm2-135m]

Run it after `lqlora data add NAME FILE && lqlora run --train NAME ...` in HOME."""

import argparse
from pathlib import Path

import duckdb
from _stamp import stamp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--home", type=Path, required=True)
    p.add_argument("--model", default="smollm2-135m")
    args = p.parse_args()
    print(stamp())
    with duckdb.connect(str(args.home / "lqlora.duckdb"), read_only=True) as con:
        print("\n## Datasets\n")
        print(con.sql("SELECT name, task, format, rows, use, sha256[:12] AS sha256 FROM datasets").df()
              .to_markdown(index=False))
        curves = con.sql(
            """SELECT coalesce(p.method, s.plan_id) || coalesce(' @ ' || p.budget, '') AS adapter, s.step,
                      round(s.loss, 4) AS train_loss, round(s.val_loss, 4) AS val_loss, round(s.seconds, 2) AS step_s
               FROM train_steps s LEFT JOIN plans p USING (plan_id)
               WHERE s.val_loss IS NOT NULL ORDER BY adapter, s.step"""
        ).df()
        print("\n## Validation curves (mean loss per response token on the validation split)\n")
        wide = curves.pivot_table(index="step", columns="adapter", values="val_loss")
        print(wide.to_markdown(floatfmt=".4f"))
        timing = con.sql(
            """SELECT coalesce(p.method, s.plan_id) AS adapter, count(*) AS steps, round(avg(s.seconds), 2) AS mean_step_s
               FROM train_steps s LEFT JOIN plans p USING (plan_id) GROUP BY 1 ORDER BY 1"""
        ).df()
        print("\n" + timing.to_markdown(index=False))
        evals = con.sql(
            """SELECT method, budget, stage, metric, round(value, 4) AS value, round(macro_f1, 4) AS macro_f1,
                      round(bits_per_param, 3) AS bits_q, round(bits_incl_lowrank, 3) AS bits_total, dataset, n_tokens
               FROM evaluations WHERE model = ? ORDER BY stage <> 'reference', method = 'reference', stage DESC""",
            params=[args.model],
        ).df()
        print("\n## Held-out evaluation\n")
        print(evals.to_markdown(index=False))


if __name__ == "__main__":
    main()
