"""A Llama-3.2-1B-shaped model for scale runs, since no package ships the real weights:
the standard initialisation from a fixed seed (honest for time and memory, not for
quality), saved as a Hugging Face folder with SmolLM2's tokenizer (its ids fit the
larger vocabulary). Optionally also a compressed copy for `bench_inference`: every
target quantized with one config and zero rank-16 factors (the storage and compute of a
real LQ model of that size, not its errors).

    python -m bench.make_llama1b_shaped OUT_FOLDER [--lq OUT_LQ_FOLDER] [--config nf3-b03-bf16-B016-B164]
    python -m bench.make_llama1b_shaped --smoke     # the tiny Llama, both folders, in a temporary folder

Then: `lqlora register OUT_FOLDER --name llama-1b-shaped && lqlora run --model llama-1b-shaped`."""

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from bench._common import REPO, add_smoke, tiny_llama, tiny_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
LQ_RANK = 16


def build(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(  # Llama-3.2-1B's published shape
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def save_compressed(model, out: Path, config_name: str, tokenizer=None) -> int:
    """Every target of `model` quantized with one config and zero rank-16 factors, saved
    as an LQ model folder; returns the number of targets."""
    from lqlora_dagster.models.targets import find_targets
    from lqlora_dagster.quant.config import QuantConfig
    from lqlora_dagster.quant.matrix import QuantizedMatrix
    from lqlora_dagster.surgery.injector import LayerInit, replace_with_lq
    from lqlora_dagster.surgery.lq_model_io import save_lq_model

    config = QuantConfig.parse(config_name)
    targets = find_targets(model)
    device = (
        "cuda" if torch.cuda.is_available() else "cpu"
    )  # faster on a GPU (check_cuda_path compares the codes)
    for i, t in enumerate(targets, 1):
        W = model.get_submodule(t.name).weight.detach().to(device)
        packed = QuantizedMatrix.quantize(W, config).to("cpu")
        init = LayerInit(packed, torch.zeros(t.rows, LQ_RANK), torch.zeros(LQ_RANK, t.cols))
        replace_with_lq(model, {t.name: init})
        if i % 16 == 0 or i == len(targets):
            print(f"quantized {i}/{len(targets)}", flush=True)
    save_lq_model(model, out, tokenizer)
    return len(targets)


def make(model, out: Path, lq: Path | None, config_name: str, copy_tokenizer) -> None:
    """Save `model` to `out` with a tokenizer (`copy_tokenizer(out)`), and its compressed copy to `lq`."""
    model.save_pretrained(out)
    copy_tokenizer(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"{out}: {n / 1e9:.2f}B parameters")
    if lq is None:
        return
    from transformers import AutoTokenizer

    count = save_compressed(model, lq, config_name, AutoTokenizer.from_pretrained(out))
    print(f"{lq}: {count} targets at {config_name}, rank {LQ_RANK}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, nargs="?")
    p.add_argument("--lq", type=Path, default=None)
    p.add_argument("--config", default="nf3-b03-bf16-B016-B164", help="the one config of the compressed copy")
    p.add_argument("--tokenizer-from", type=Path, default=REPO / ".lqlora/models/smollm2-135m")
    add_smoke(p)
    args = p.parse_args()
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            make(
                tiny_llama(),
                Path(tmp) / "tiny",
                Path(tmp) / "tiny-lq",
                args.config,
                lambda out: tiny_tokenizer().save_pretrained(out),
            )
        return
    if args.out is None:
        p.error("OUT_FOLDER is required")

    def copy_tokenizer(out: Path) -> None:
        for name in TOKENIZER_FILES:
            if (args.tokenizer_from / name).is_file():
                shutil.copy(args.tokenizer_from / name, out / name)

    make(build(), args.out, args.lq, args.config, copy_tokenizer)


if __name__ == "__main__":
    main()
