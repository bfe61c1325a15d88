"""Small run configs for materializing the graph on the tiny model (tests/conftest.py)."""


def tiny_run_config(budgets=(3.0,), methods=("lqlora-fisher",), steps=3) -> dict:
    return {
        "ops": {
            "calibration_batches": {"config": {"n_sequences": 4, "seq_len": 64}},
            "error_table": {"config": {"methods": list(methods), "rank": 4, "grid": "reduced"}},
            "allocation_plan": {"config": {"budgets": list(budgets)}},
            "finetuned_adapters": {"config": {"steps": steps, "batch_size": 2, "seq_len": 64}},
            "evaluation": {"config": {"seq_len": 64, "n_windows": 4}},
        }
    }
