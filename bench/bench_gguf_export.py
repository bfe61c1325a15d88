"""Our ILP-chosen GGUF against llama.cpp's `llama-quantize` presets at equal file size,
all in llama.cpp: file size, bits per target weight, held-out perplexity, and prefill /
decode tokens/s. The presets get an importance matrix (`llama-imatrix`) computed from the
calibration text the Fisher stage used; our mix is planned from the same text's Fisher
diagonal. For each preset our plan gets the preset's file size as its budget and its
embedding type for our non-target matrices, so the two differ only in how the target
matrices' types were chosen. Ours is exported twice: from the uncompressed model, and
from the finetuned LQ-LoRA model of the run (merged).

    python -m bench.bench_gguf_export --home LQLORA_HOME --tools LLAMA_CPP/build/bin \\
        [--model smollm2-135m] [--presets Q3_K_S Q3_K_M IQ4_XS Q4_K_M] [--threads 1]

LQLORA_HOME holds a finished `lqlora run` of the model (its Fisher diagonals, task data
and finetuned adapter). --tools is where `llama-quantize` and `llama-imatrix` were built
(cmake --build build --target llama-quantize llama-imatrix, in llama.cpp's tree).
--smoke: a tiny Llama built in code, our plans at two sizes, no presets."""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench._common import add_smoke, stamp
from lqlora_dagster.export.ggml_types import CANDIDATES


def target_bits(path: Path, targets: set[str]) -> float:
    from gguf import GGUFReader

    found = [(int(t.n_bytes), int(t.n_elements)) for t in GGUFReader(path).tensors if t.name in targets]
    return 8 * sum(b for b, _ in found) / sum(n for _, n in found)


def tensor_type(path: Path, name: str) -> str:
    from gguf import GGUFReader

    return next(t.tensor_type.name for t in GGUFReader(path).tensors if t.name == name)


class OurMix:
    """One source model converted once, its (tensor, type) table priced once, then a file
    per budget."""

    def __init__(self, merged: Path, fisher: dict[str, torch.Tensor], work: Path, tag: str, types: list[str]):
        from gguf import GGUFReader

        from lqlora_dagster.export.folders import write_fisher_twin
        from lqlora_dagster.export.ggml_types import ggml_type
        from lqlora_dagster.export.gguf_mix import marked_targets, type_table
        from lqlora_dagster.export.hf_to_gguf import convert

        self.tag, self.work = tag, work
        twin = write_fisher_twin(merged, fisher, work / f"{tag}-fisher")
        convert(merged, work / f"{tag}-f32.gguf", log=lambda s: None)
        convert(twin, work / f"{tag}-fisher.gguf", log=lambda s: None)
        self.weights = GGUFReader(work / f"{tag}-f32.gguf")
        self.fisher = GGUFReader(work / f"{tag}-fisher.gguf")
        self.targets = set(marked_targets(self.fisher))
        start = time.perf_counter()
        self.table = type_table(self.weights, self.fisher, tuple(ggml_type(t) for t in types))
        self.table_s = time.perf_counter() - start

    def at_size(self, max_bytes: int, other: str, name: str) -> Path:
        from lqlora_dagster.export.ggml_types import ggml_type
        from lqlora_dagster.export.gguf_export import plan_types, target_budget
        from lqlora_dagster.export.gguf_mix import non_target_bytes, write_mixed

        numel = int(self.table.groupby("matrix")["numel"].first().sum())
        budget = target_budget(None, max_bytes, non_target_bytes(self.weights, self.targets, ggml_type(other)), numel)
        picks, _, _ = plan_types(self.table, budget)
        out = self.work / f"{name}.gguf"
        write_mixed(self.weights, self.fisher, out, {n: ggml_type(t) for n, t in picks.items()}, ggml_type(other))
        return out


def measure(path: Path, windows: torch.Tensor, threads: int, prompt: list[int], new_tokens: int) -> dict:
    from lqlora_dagster.export import llama_runtime

    speed = llama_runtime.decode_speed(path, prompt, new_tokens, threads=threads)
    return {"mb": path.stat().st_size / 1e6, "ppl": llama_runtime.perplexity(path, windows, threads=threads), **speed}


def real_inputs(home: Path, model: str, work: Path):
    """(base folder, finetuned merged folder, Fisher, held-out windows, calibration text,
    in-tool perplexity) from a finished run."""
    from assets.runs import stored_handle
    from lqlora_dagster.data.selection import part_stream
    from lqlora_dagster.data.windows import tokenize
    from lqlora_dagster.export.folders import write_merged
    from lqlora_dagster.models.loading import load_tokenizer
    from lqlora_dagster.pipeline.calibration import load_fisher
    from lqlora_dagster.pipeline.context import StageContext
    from lqlora_dagster.pipeline.export_check import held_out_windows, in_tool_perplexity
    from lqlora_dagster.pipeline.finetuning import load_finetuned
    from lqlora_dagster.pipeline.settings import ExportSettings
    from lqlora_dagster.surgery.injector import to_dense

    ctx = StageContext.at(home)
    base = stored_handle(home, "base_model", model)
    data = stored_handle(home, "task_data", model)
    ref = next(a for a in stored_handle(home, "finetuned_adapters", model).items if a.plan_id != "reference")
    fisher = load_fisher(ctx, stored_handle(home, "fisher_diagonals", model))
    tokenizer = load_tokenizer(Path(base.folder))
    merged = write_merged(to_dense(load_finetuned(ctx, base, ref), merge=True), tokenizer, work / "finetuned")
    windows = held_out_windows(base, data, ExportSettings())
    calib = tokenizer.decode(part_stream(data, "calibration", lambda t: tokenize(tokenizer, t)).tolist())
    label = f"{ref.method} @ {ref.budget:g}"
    return Path(base.folder), merged, fisher, windows, calib, in_tool_perplexity(ctx, base, ref, data, windows,
                                                                                  ExportSettings()), label


def smoke_inputs(work: Path):
    from lqlora_dagster.export.folders import unit_fisher
    from tests.tiny_models import save_tiny_llama, tiny_tokenizer

    merges = (("Ġ", "t"), ("h", "e"), ("Ġt", "he"))
    folder = save_tiny_llama(work / "tiny", tokenizer=tiny_tokenizer(merges))
    shapes = {f"model.layers.{i}.{b}.{k}": s for i in range(2) for b, ks in
              (("self_attn", {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64)}),
               ("mlp", {"gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)}))
              for k, s in ks.items()}
    windows = torch.randint(3, 200, (2, 32), generator=torch.Generator().manual_seed(0))
    return folder, folder, unit_fisher(shapes), windows, "", float("nan"), "tiny (not finetuned)"


def run_tool(tools: Path, name: str, *args: str) -> None:
    done = subprocess.run([str(tools / name), *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{name} failed:\n{done.stderr[-2000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--home", type=Path)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tools", type=Path, help="the folder holding llama-quantize and llama-imatrix")
    p.add_argument("--presets", nargs="+", default=["Q3_K_S", "Q3_K_M", "IQ4_XS", "Q4_K_M"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--types", nargs="+", default=[t.name for t in CANDIDATES],
                   help="the llama.cpp types our plans may use (default: all of `lqlora export`'s)")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    add_smoke(p)
    args = p.parse_args()
    if not args.smoke and (args.home is None or args.tools is None):
        p.error("--home and --tools are needed (or --smoke)")
    print(stamp())
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        work = Path(tmp)
        inputs = smoke_inputs(work) if args.smoke else real_inputs(args.home, args.model, work)
        base_folder, finetuned, fisher, windows, calib, in_tool, label = inputs
        prompt = [int(i) for i in windows[0, : min(args.prompt_len, windows.shape[1])]]
        new_tokens = 4 if args.smoke else args.new_tokens
        mixes = {"uncompressed": OurMix(base_folder, fisher, work, "base", args.types)}
        if not args.smoke:
            mixes[label] = OurMix(finetuned, fisher, work, "finetuned", args.types)
        for name, mix in mixes.items():
            print(f"# our (tensor, type) table from the {name} model: {len(mix.table)} rows, {mix.table_s:.1f} s")
        targets = mixes["uncompressed"].targets
        sizes: dict[str, tuple[int, str]] = {}
        rows = []
        f32 = work / "base-f32.gguf"
        if args.smoke:
            q8 = mixes["uncompressed"].at_size(10**9, "Q8_0", "q8").stat().st_size
            numel = int(mixes["uncompressed"].table.groupby("matrix")["numel"].first().sum())
            sizes = {f"{b} bits": (int(q8 - numel * (8.5 - b) / 8), "Q8_0") for b in (5.0, 6.0)}
        else:
            (work / "calib.txt").write_text(calib)
            t = str(args.threads)
            run_tool(args.tools, "llama-imatrix", "-m", str(f32), "-f", str(work / "calib.txt"), "-o",
                     str(work / "imatrix.gguf"), "-c", "256", "--chunks", "32", "-t", t)
            rows.append(("f32 (converted)", "", f32))
            for preset in args.presets:
                out = work / f"preset-{preset}.gguf"
                run_tool(args.tools, "llama-quantize", "--imatrix", str(work / "imatrix.gguf"), str(f32), str(out),
                         preset, t)
                rows.append((f"llama-quantize {preset} + imatrix", preset, out))
                sizes[preset] = (out.stat().st_size, tensor_type(out, "token_embd.weight"))
        for size_name, (size, embd) in sizes.items():
            for name, mix in mixes.items():
                path = mix.at_size(size, embd, f"ours-{mix.tag}-{size_name.replace(' ', '')}")
                rows.append((f"ours, {name}, at {size_name}'s size", size_name, path))
        print(f"\n# {len(windows)} held-out windows of {windows.shape[1]} tokens, llama.cpp, {args.threads} thread(s); "
              f"prefill {len(prompt)} tokens, decode {new_tokens}")
        print(f"# in lqlora, the finetuned {label}: perplexity {in_tool:.3f}; our types: {' '.join(args.types)}")
        print("| file | size MB | bits per target weight | perplexity | prefill tok/s | decode tok/s |")
        print("|---|---|---|---|---|---|")
        for name, _, path in rows:
            m = measure(path, windows, args.threads, prompt, new_tokens)
            print(f"| {name} | {m['mb']:.2f} | {target_bits(path, targets):.3f} | {m['ppl']:.3f} | "
                  f"{m['prefill_tok_s']:.0f} | {m['decode_tok_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
