"""The base-model partitions, and the one-line summary every stage asset reports."""

import warnings

import dagster as dg

BASE_MODELS = dg.DynamicPartitionsDefinition(name="base_models")

# Every asset reports a data version (its content key) on purpose, so Dagster can tell
# stale from fresh; the beta notice it prints for each one is noise in users' logs.
warnings.filterwarnings("ignore", message="Parameter `data_version`", category=dg.BetaWarning)


def summary(parts: list[str], limit: int = 3) -> str:
    """What an asset produced, in one line for the CLI ("a; b; c; and 4 more")."""
    shown = "; ".join(parts[:limit])
    return shown + (f"; and {len(parts) - limit} more" if len(parts) > limit else "")
