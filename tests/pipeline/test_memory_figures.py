"""The memory figures the graph stores in DuckDB tell a compressed model from fp32.

The whole graph runs on a Llama whose target weights are big enough to measure (51 MB of
them in fp32, against the tiny byte-level vocabulary of 259 entries, so neither the
embedding nor the logits hide the difference; the 64-wide tiny model's are too small),
and the `evaluations` rows must show the compressed model costing well under what the
fp32 reference costs to load and score. The graph runs in a process of its own: the
figures are peaks above what the process held, and a test worker's history (freed
arenas, libraries other tests loaded) would otherwise decide part of them."""

import subprocess
import sys
from pathlib import Path

import pytest

from lqlora_dagster.store.warehouse import Warehouse
from tests.tiny_models import save_tiny_llama, tiny_tokenizer

MODEL = "wide-llama"
REPO = Path(__file__).resolve().parents[2]

RUN = """
import sys
from pathlib import Path
from tests.conftest import registered_home
from tests.pipeline.conftest import tiny_run_config
from tests.pipeline.test_materialize import materialize

home, folder = Path(sys.argv[1]), Path(sys.argv[2])
with registered_home(home, {"wide-llama": folder}) as (_, instance):
    # QLoRA-ILP: its error table needs no LQ iterations, so the whole graph runs in a minute
    result = materialize(home, tiny_run_config(methods=("qlora-ilp",), steps=1), instance, partition="wide-llama")
sys.exit(0 if result.success else 1)
"""


@pytest.fixture(scope="module")
def wide_llama_folder(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("wide-llama"), hidden_size=768, intermediate_size=2048,
                           num_attention_heads=12, num_key_value_heads=4, vocab_size=len(tiny_tokenizer()))


def test_evaluation_memory_in_duckdb_differs_between_fp32_and_compressed(tmp_path, wide_llama_folder):
    done = subprocess.run([sys.executable, "-c", RUN, str(tmp_path), str(wide_llama_folder)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = Warehouse(tmp_path / "lqlora.duckdb").query("SELECT stage, peak_mb FROM evaluations WHERE model = ?",
                                                     [MODEL]).set_index("stage")["peak_mb"]
    fp32, compressed = rows["reference"], rows["before_finetune"]
    assert fp32 > 40, rows  # the dense target weights alone are 51 MB
    assert compressed < 0.5 * fp32, rows  # 3 bits plus rank-4 factors: about a tenth of the weights' bytes
