"""Every benchmark runs: `python -m bench.NAME --smoke` measures a tiny model built in code
and prints its tables in the format of a real run. The scripts run a few at a time (a
subprocess each, as a user runs them); each test then reads one script's output."""

import ast
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"

# script -> (extra arguments, what its output must hold: literal lines or regexes)
SMOKES: dict[str, tuple[list[str], list[str]]] = {
    "bench_error_table": (
        [],
        [
            "# per-config (e - e_exhaustive) / e_exhaustive, exhaustive = seed 0",
            r"# confirmed plans \(margin [\d.]+\)",
            r"budget 3\.25: same (True |False) [+-][\d.]+%   \([\d.]+ bits/param, \d+ rounds\)",
            r"method\s+wall s s/matrix speed-up\s+max rel\s+median worst plan plans ok fair worst",
            r"default \+ confirm\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+%",
        ],
    ),
    "bench_fisher_memory": (
        [],
        [
            "| | seconds | added MB | added / target MB |",
            r"model .*: 14 targets, .* 2 windows of 32 tokens",
            r"\| estimate_fisher \| [\d.,]+ \| [\d,]+ \| [\d.]+ \|",
        ],
    ),
    "bench_full_graph": (
        [],
        [
            r"model tiny-llama in .*: `lqlora run` exited 0 after [\d.]+ h",
            "| stage | seconds | added MB | process peak MB |",
            r"\| evaluation \| [\d.,]+ \| -?[\d,]+ \| [\d,]+ \|",
            r"\| all stages \| [\d.,]+ \| \| [\d,]+ \|",
            "| shape | matrices | median seconds per matrix (fastest-slowest) | µs per weight (median) |",
            r"\| 128 x 64 \| 4 \| [\d.]+ \([\d.]+-[\d.]+\) \| [\d.]+ \|",
            "what the confirmation bought:",
            r"plan \w+ \(lqlora-fisher @ 3\.25\): confirmed, exact error [\d.e+-]+; `--no-confirm` would",
        ],
    ),
    "bench_gguf_export": (
        [],
        [
            "| file | size MB | bits per target weight | perplexity | prefill tok/s | decode tok/s |",
            r"# our \(tensor, type\) table from the uncompressed model: 84 rows, [\d.]+ s",
            r"\| ours, uncompressed, at 5\.0 bits's size \| [\d.]+ \| 4\.\d+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|",
        ],
    ),
    "bench_inference": (
        [],
        [
            "| work | threads | model | load s | prefill tok/s | decode tok/s | step s | added MB |",
            r"\| generate \| 1 \| lq \| [\d.]+ \| [\d.]+ \| [\d.]+ \| nan \| [\d,]+ \|",
            r"\| ratio lq/fp32 \| 1 \| \| \| [\d.]+x \| [\d.]+x \| \| [\d.]+x \|",
            r"\| train-ckpt \| 1 \| lq \| [\d.]+ \| nan \| nan \| [\d.]+ \| [\d,]+ \|",
        ],
    ),
    "bench_lq_convergence": (
        [],
        [
            "3 matrices x 3 configs, 20 iterations, rank 16",
            r"stop at 0\.1% \(reference\)\s+\d+\s+[+-][\d.]+% \(max [+-][\d.]+%\)\s+\d+% \([\d.]+%, [\d.]+%\)",
            r"best of 20\s+20 ",
        ],
    ),
    "bench_matrix_threads": (
        [],
        [
            "# layers [0]: 7 matrices x 4 configs, rank 16; plans at 1 budget(s)",
            r"how\s+wall s\s+configs bit-identical to 1 thread\s+>1% off\s+median\s+max worst plan plans within 0\.5%",
            # one thread per matrix gives the one-thread errors bit for bit, several at a time or not
            r"1 matrix at a time, 1 torch thread\s+[\d.]+\s+28 of 28\s+0%\s+0\.00%\s+0\.0%\s+\+0\.00%\s+1/1",
            r"\d+ matrices at a time, 1 thread each\s+[\d.]+\s+28 of 28\s+0%",
        ],
    ),
    "bench_multirank_table": (
        [],
        [
            "| matrix | shape | single rank s | multi rank s | ratio |",
            r"\| model\.layers\.0\.mlp\.down_proj \| \(64, 128\) \| [\d.]+ \| [\d.]+ \| [\d.]+ \|",
            r"multi-rank table:\s+\d+ s, whole model [\d.]+ min on one core; ratio [\d.]+x",
            r"\| 24 \| 14 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| \d+ \|",
        ],
    ),
    "bench_nf4_quality": (
        [],
        [
            r"init\s+rank\s+ppl\s+vs fp32\s+bits\s+\+low rank\s+s",
            r"fp32 reference\s+[\d.]+",
            r"qlora\s+16\s+[\d.]+\s+[+-][\d.]+%\s+[\d.]+\s+[\d.]+",
            r"lqlora-fisher\s+8\s+[\d.]+\s+[+-][\d.]+%\s+[\d.]+\s+[\d.]+",
        ],
    ),
    "bench_peft_loftq": (
        [],
        [
            "| init | matrices | seconds | added MB | GPU peak MB | result |",
            r"\| PEFT LoftQ \(NF4, 5 iterations\) \|",  # runs, or says what PEFT raised
            r"\| lqlora-dagster LoftQ \(NF4, 5 iterations\) \| 7 \| [\d.]+ \| -?[\d,]+ \| nan \| ran \|",
        ],
    ),
    "bench_warm_power": (
        [],
        [
            r"\d+ matrices \(layers \[0\]\) x 2 configs, rank 4, unweighted",
            r"\| every fit \(before\) \| [\d.]+ \(1\.00x\) \| \d+ \| \+0\.000% \|",
            r"\| every fit, SVD seed 1 \| [\d.]+ \([\d.]+x\) \| \d+ \| [+-][\d.]+% \|",
            r"\| the first 3 fits \(now\) \| [\d.]+ \([\d.]+x\) \| \d+ \| [+-][\d.]+% \|",
            r"\| the first fit only \| [\d.]+ \([\d.]+x\) \| \d+ \| [+-][\d.]+% \|",
        ],
    ),
    "bench_shape_cost": (
        [],
        [
            r"\| 64x64 \| fast table, 432 configs \(CPU s\) \| [\d.]+ \| [\d.]+ \| [\d.]+x \|",
            r"\| 64x64 \| one LQ iteration \(CPU s\) \| [\d.]+ \| [\d.]+ \| [\d.]+x \|",
        ],
    ),
    "bench_stage_cpu": (
        [],
        [
            r"\| stage \(.+\) \| steps \| wall s \| CPU s \|",
            r"\| error_table \| 9 \| \d+ \| [\d.]+ \|",
            r"\| allocation_plan \| 1 \| \d+ \| [\d.]+ \|",
            r"\| whole run \(`lqlora run`, launch and display included\) \| \| \d+ \| [\d.]+ \|",
        ],
    ),
    "bench_scale": (
        [],
        [
            "## Measured: fast error-table rows of one matrix (432 configs, rank 16, one thread)",
            r"\| 128 x 64 \| 8,192 \| [\d.]+ \| [\d.]+ \|",
            r"extrapolating with: seconds = ",
            r"\| Llama-2-70B \| 560 \| 68\.45B \| [\d.]+ \|",
        ],
    ),
    "check_cuda_path": (
        ["--device", "cpu"],
        [
            r"\| 64 x 48 \| 14 \| 14 \| 0\.00% \| 0\.00e\+00 \| 14 \| 0 \|",
            r"LQ layer on cpu vs CPU, largest relative difference: output [\d.e+-]+",
            r"\| fast error-table rows \(64 x 64\), 432 configs \| cpu \| [\d.]+ \| sum [\d.]+ \|",
            "decode mismatches: 0",
        ],
    ),
    "make_llama1b_shaped": (
        [],
        [
            r"tiny: 0\.00B parameters",
            "quantized 14/14",
            r"tiny-lq: 14 targets at nf3-b03-bf16-B016-B164, rank 16",
        ],
    ),
    "profile_decode": (
        [],
        [
            r"- decode, no timers: \*\*[\d.]+ ms per token\*\* \([\d.]+ tokens/s\)",
            r"\| LQLinear \| [\d.]+ \| \d+% \|",
            r"\| packed matrix-vector products \(codes, scales\) \| [\d.]+ \| [\d.]+ \| [\d.]+ \|",
            r"streaming read bandwidth, one `sum` over 256 MB at 1 thread\(s\): [\d.]+ GB/s",
        ],
    ),
    "profile_prefill_layers": (
        [],
        [
            r"1 thread\(s\), nf3-b03-bf16-B016-B164, 16 tokens, ms summed over 14 layers: fp32 matmul \d+, "
            r"LQ layer \d+, decode \d+, decode \+ matmul \d+, low rank \d+, folded \d+",
        ],
    ),
}
LANES = 3  # scripts at a time: each waits on subprocesses and files part of its time, so 3 fill 2 cores
UNSTAMPED = {
    "make_llama1b_shaped",
    "profile_prefill_layers",
}  # they build or profile; no result file quotes a stamp


def scripts() -> list[str]:
    return sorted(p.stem for p in BENCH.glob("*.py") if not p.stem.startswith("_"))


def run_smoke(name: str, home: Path) -> subprocess.CompletedProcess:
    # several run at once: one torch thread unless a bench asks for more, and idle OpenMP
    # threads that sleep instead of spinning against the other scripts
    env = dict(os.environ, LQLORA_HOME=str(home / name), OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    return subprocess.run(
        [sys.executable, "-m", f"bench.{name}", "--smoke", *SMOKES[name][0]],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    home = tmp_path_factory.mktemp("bench-home")
    with ThreadPoolExecutor(LANES) as pool:
        # the longest first, so the lanes end together
        order = sorted(
            SMOKES, key=lambda n: n not in ("bench_full_graph", "bench_inference", "bench_peft_loftq")
        )
        return dict(zip(order, pool.map(lambda n: run_smoke(n, home), order)))


def test_every_script_has_a_smoke_run():
    assert scripts() == sorted(SMOKES)


def test_one_import_style():
    """Bench modules import each other as `bench.NAME` and never patch sys.path."""
    for path in BENCH.glob("*.py"):
        tree = ast.parse(path.read_text())
        relative = [
            ast.unparse(n)
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom)
            and (n.level or (n.module or "").startswith("_") or (n.module or "").split(".")[0] in scripts())
        ]
        assert relative == [], f"{path.name}: import bench modules as `from bench.X import ...`"
        assert "sys.path" not in path.read_text(), f"{path.name} patches sys.path"


@pytest.mark.parametrize("name", sorted(SMOKES))
def test_smoke_prints_its_numbers(smoke_runs, name):
    done = smoke_runs[name]
    assert done.returncode == 0, f"{name} --smoke exited {done.returncode}:\n{done.stderr[-3000:]}"
    lines = done.stdout.splitlines()
    if name not in UNSTAMPED:
        assert (
            lines[0].startswith("- date: ") and f"- command: `python -m bench.{name} --smoke" in done.stdout
        )
        assert re.search(r"^- code versions: .*error_table \d+", done.stdout, re.M)
    for expected in SMOKES[name][1]:
        found = expected in lines or any(re.search(expected, line) for line in lines)
        assert found, f"{name} --smoke printed no line matching {expected!r}:\n{done.stdout[-3000:]}"
