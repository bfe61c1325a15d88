"""A Llama-3.2-1B-shaped model for scale runs, since no package ships the real weights:
the standard initialisation from a fixed seed (honest for time and memory, not for
quality), saved as a Hugging Face folder with SmolLM2's tokenizer (its ids fit the
larger vocabulary). Optionally also a compressed copy for `bench_inference.py`: every
target quantized with one config and zero rank-16 factors (the storage and compute of a
real LQ model of that size, not its errors).

    python bench/make_llama1b_shaped.py OUT_FOLDER [--lq OUT_LQ_FOLDER] [--config nf3-b03-bf16-B016-B164]

Then: `lqlora register OUT_FOLDER --name llama-1b-shaped && lqlora run --model llama-1b-shaped`."""

import argparse
import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def build(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(  # Llama-3.2-1B's published shape
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=8192,
        rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--lq", type=Path, default=None)
    p.add_argument("--config", default="nf3-b03-bf16-B016-B164", help="the one config of the compressed copy")
    p.add_argument("--tokenizer-from", type=Path, default=Path(".lqlora/models/smollm2-135m"))
    args = p.parse_args()
    model = build()
    model.save_pretrained(args.out)
    for name in TOKENIZER_FILES:
        if (args.tokenizer_from / name).is_file():
            shutil.copy(args.tokenizer_from / name, args.out / name)
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: {n / 1e9:.2f}B parameters")
    if args.lq is None:
        return
    from transformers import AutoTokenizer

    from lqlora_dagster.models.targets import find_targets
    from lqlora_dagster.quant.config import QuantConfig
    from lqlora_dagster.quant.matrix import QuantizedMatrix
    from lqlora_dagster.surgery.injector import LayerInit, replace_with_lq
    from lqlora_dagster.surgery.lq_model_io import save_lq_model

    config = QuantConfig.parse(args.config)
    targets = find_targets(model)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # faster on a GPU (check_cuda_path.py compares the codes)
    for i, t in enumerate(targets, 1):
        W = model.get_submodule(t.name).weight.detach().to(device)
        packed = QuantizedMatrix.quantize(W, config).to("cpu")
        init = LayerInit(packed, torch.zeros(t.rows, 16), torch.zeros(16, t.cols))
        replace_with_lq(model, {t.name: init})
        if i % 16 == 0 or i == len(targets):
            print(f"quantized {i}/{len(targets)}", flush=True)
    save_lq_model(model, args.lq, AutoTokenizer.from_pretrained(args.out))
    print(f"{args.lq}: {len(targets)} targets at {config.name}, rank 16")


if __name__ == "__main__":
    main()
