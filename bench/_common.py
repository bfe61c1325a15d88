"""What every benchmark shares: the stamp it prints first, the matrices and models it
measures (real SmolLM2-135M, or tiny ones built in code for `--smoke`), and the
`--smoke` flag itself.

The stamp says when, by which command and by which code a result in bench/results/ was
produced: the date, the command line, the git commit and the `code_version` of every
asset (what makes Dagster re-mark it stale)."""

import argparse
import datetime
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# the tiny model of --smoke: SmolLM2's layout (grouped-query attention, a 2.7x MLP) at 64 wide
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}
TINY_SHAPES = {
    "q_proj": (64, 64),
    "k_proj": (32, 64),
    "v_proj": (32, 64),
    "o_proj": (64, 64),
    "gate_proj": (128, 64),
    "up_proj": (128, 64),
    "down_proj": (64, 128),
}
TINY_VOCAB = 256


# --- the stamp ---------------------------------------------------------------------------


def code_versions() -> dict[str, str]:
    from lqlora_dagster.definitions import build_definitions

    defs = build_definitions(Path("/tmp"))
    return {
        key.to_user_string(): version
        for asset in defs.assets
        for key, version in asset.code_versions_by_key.items()
        if version is not None
    }


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()


def stamp() -> str:
    commit = _git("rev-parse", "--short", "HEAD") or os.environ.get("LQLORA_COMMIT", "unknown")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    versions = ", ".join(f"{k} {v}" for k, v in sorted(code_versions().items()))
    command = " ".join([f"python -m bench.{Path(sys.argv[0]).stem}", *sys.argv[1:]])  # as every bench runs
    return "\n".join(
        [
            f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
            f"- command: `{command}`",
            f"- commit: {commit}{' (with uncommitted changes)' if dirty else ''}",
            f"- code versions: {versions}",
        ]
    )


# --- --smoke -------------------------------------------------------------------------------


def add_smoke(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="run in seconds on a tiny model built in code: checks the script, measures nothing",
    )


# --- the matrices measured ------------------------------------------------------------------


def smollm2_folder() -> Path:
    from lqlora_dagster.models.source import resolve_model_folder

    home = Path(os.environ.get("LQLORA_HOME", REPO / ".lqlora"))
    return resolve_model_folder("smollm2-135m", home / "models")[0]


def smollm2_weights_file() -> Path:
    return smollm2_folder() / "model.safetensors"


def module_name(layer: int, kind: str) -> str:
    block = "mlp" if kind in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return f"model.layers.{layer}.{block}.{kind}"


def tiny_matrices(layers: list[int]) -> dict[str, torch.Tensor]:
    """SmolLM2's seven target kinds per layer at the tiny model's shapes, N(0, 0.02) from a
    seed per layer (honest for code paths and time, not for errors)."""
    out = {}
    for layer in layers:
        gen = torch.Generator().manual_seed(layer)
        for kind in KINDS:
            out[module_name(layer, kind)] = torch.randn(*TINY_SHAPES[kind], generator=gen) * 0.02
    return out


def layer_matrices(layers: list[int], smoke: bool = False) -> dict[str, torch.Tensor]:
    """{"model.layers.L.<...>.kind": (out, in) fp32 weight} for the given layers."""
    if smoke:
        return tiny_matrices(layers)
    from safetensors import safe_open

    out = {}
    with safe_open(str(smollm2_weights_file()), "pt") as f:
        for key in f.keys():
            parts = key.split(".")
            if key.endswith("proj.weight") and int(parts[2]) in layers and parts[-2] in KINDS:
                out[key[: -len(".weight")]] = f.get_tensor(key).to(torch.float32)
    return out


def all_target_matrices(smoke: bool = False) -> dict[str, torch.Tensor]:
    """Every one of SmolLM2's 210 target matrices, by module name (the tiny model's 14)."""
    if smoke:
        return tiny_matrices([0, 1])
    from safetensors import safe_open

    with safe_open(str(smollm2_weights_file()), "pt") as f:
        n_layers = 1 + max(int(k.split(".")[2]) for k in f.keys() if k.startswith("model.layers."))
    return layer_matrices(list(range(n_layers)))


# --- the tiny model of --smoke ------------------------------------------------------------


def tiny_llama(seed: int = 0, layers: int = 2):
    """A Llama of SmolLM2's layout at 64 wide, random from `seed`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        **TINY,
        num_hidden_layers=layers,
        vocab_size=TINY_VOCAB,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def tiny_tokenizer():
    """A word-level tokenizer built in code: printable characters and a few common words,
    every other word one unknown id. Fast on the bundled corpora, which a smoke run
    tokenizes whole."""
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the of and to in a that is for be our we it this have will by with as are not on".split()
    tokens = ["<|endoftext|>", "<unk>", *string.digits, *string.ascii_letters, *string.punctuation, *words]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(tokens))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>")


def save_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """The tiny Llama and its tokenizer as a Hugging Face folder."""
    folder.mkdir(parents=True, exist_ok=True)
    tiny_llama(seed).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
