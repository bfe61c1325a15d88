#!/usr/bin/env bash
# The whole main job on the Llama-3.2-1B-shaped model, from nothing, on this machine:
# build the model (fixed seed), register it in a fresh LQLORA_HOME, take in the rows an
# earlier machine carried over (bench/carry_rows.py; none: start from scratch), then
# run and measure every stage (bench/bench_full_graph.py). Extra arguments go to
# `lqlora run`, e.g. `-- --steps 5`.
#
#   bash bench/llama1b_full_graph.sh HOME [CARRIED_FOLDER] [-- LQLORA RUN FLAGS]
set -euo pipefail
cd "$(dirname "$0")/.."
home=$1; shift
carried=""
if [ $# -gt 0 ] && [ "$1" != "--" ]; then carried=$1; shift; fi
[ "${1:-}" = "--" ] && shift
export LQLORA_HOME=$home
model=${LLAMA1B_FOLDER:-$home/llama1b}
py=.venv/bin/python
if [ ! -f "$model/model.safetensors" ]; then
  tokenizer=$($py -c "from pathlib import Path; from lqlora_dagster.models.source import resolve_model_folder; print(resolve_model_folder('smollm2-135m', Path('$home/models'))[0])")
  $py bench/make_llama1b_shaped.py "$model" --tokenizer-from "$tokenizer"
fi
.venv/bin/lqlora models | grep -q '^llama-1b-shaped' || .venv/bin/lqlora register "$model" --name llama-1b-shaped
since=$(date -u +%Y-%m-%dT%H:%M:%S)
if [ -n "$carried" ]; then
  $py bench/carry_rows.py import "$carried"
  since=$($py -c "import pandas as pd; print(pd.read_parquet('$carried/stage_runs.parquet')['started_at'].min().isoformat())")
fi
exec $py bench/bench_full_graph.py --model llama-1b-shaped --since "$since" -- "$@"
