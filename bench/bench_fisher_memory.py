"""What the Fisher stage costs: seconds and the memory `estimate_fisher` adds on top of
the loaded model, beside the size of the target weights (the floor: one fp32 sum per
target weight). Token windows are drawn from a fixed seed: time and memory do not
depend on the text.

    python -m bench.bench_fisher_memory [--model FOLDER] [--sequences 8] [--seq-len 256] [--smoke]

Without --model it measures the bundled SmolLM2-135M."""

import argparse
import tempfile
import time
from pathlib import Path

from bench._common import add_smoke, save_tiny_llama, smollm2_folder, stamp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="an HF folder (default: the bundled SmolLM2)")
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    add_smoke(p)
    args = p.parse_args()
    print(stamp())
    if args.smoke:  # the tiny Llama, 2 windows of 32 tokens
        with tempfile.TemporaryDirectory() as tmp:
            measure(save_tiny_llama(Path(tmp) / "tiny"), 2, 32)
    else:
        measure(args.model or smollm2_folder(), args.sequences, args.seq_len)


def measure(folder: Path, sequences: int, seq_len: int) -> None:
    import torch

    from lqlora_dagster.fisher import estimate_fisher
    from lqlora_dagster.memory import MB, PeakMemory
    from lqlora_dagster.models.loading import load_model
    from lqlora_dagster.models.targets import find_targets

    with PeakMemory() as loading:
        model = load_model(folder, "causal-lm")
        targets = find_targets(model)
    vocab = model.get_input_embeddings().num_embeddings
    windows = torch.randint(0, vocab, (sequences, seq_len), generator=torch.Generator().manual_seed(0))
    target_mb = sum(t.numel for t in targets) * 4 / MB
    start = time.perf_counter()
    with PeakMemory() as fisher:
        estimate_fisher(model, windows, targets)
    seconds = time.perf_counter() - start
    print(f"\nmodel {folder}: {len(targets)} targets, {target_mb:,.0f} MB of fp32 target weights; "
          f"{sequences} windows of {seq_len} tokens, {torch.get_num_threads()} torch threads\n")
    print("| | seconds | added MB | added / target MB |")
    print("|---|---|---|---|")
    print(f"| load the model | | {loading.added_mb:,.0f} | {loading.added_mb / target_mb:.2f} |")
    print(f"| estimate_fisher | {seconds:,.1f} | {fisher.added_mb:,.0f} | {fisher.added_mb / target_mb:.2f} |")


if __name__ == "__main__":
    main()
