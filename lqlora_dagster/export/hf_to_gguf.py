"""A Hugging Face folder to a GGUF file, by llama.cpp's own converter.

llama.cpp's convert_hf_to_gguf.py knows each architecture's tensor names, the
re-ordering of attention rows llama.cpp expects and how to write each tokenizer; it
ships in llama-cpp-python's source distribution, which the setup unpacks under
`<venv>/share/lqlora/llama.cpp` (or `LQLORA_LLAMA_CPP` names a llama.cpp checkout).
The architectures it converts are read from its model map, so an export of one it does
not know is refused before any work.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

from lqlora_dagster.errors import LQLoRAInputError

RUNNER = Path(__file__).with_name("convert_runner.py")
SETUP = "run ./.ci/setup-env.sh (it unpacks llama.cpp's converter), or set LQLORA_LLAMA_CPP to a llama.cpp checkout"


def converter_tree() -> Path:
    named = os.environ.get("LQLORA_LLAMA_CPP")
    tree = Path(named) if named else Path(sys.prefix) / "share" / "lqlora" / "llama.cpp"
    if not (tree / "convert_hf_to_gguf.py").is_file() or not (tree / "conversion").is_dir():
        raise LQLoRAInputError(f"llama.cpp's converter is not at {tree}; {SETUP}")
    return tree


def known_architectures(tree: Path) -> set[str]:
    """The `architectures` names (config.json) the converter writes as text models."""
    source = (tree / "conversion" / "__init__.py").read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.AnnAssign | ast.Assign):
            target = node.target if isinstance(node, ast.AnnAssign) else node.targets[0]
            if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP":
                return set(ast.literal_eval(node.value))
    raise LQLoRAInputError(f"cannot read the converter's model map in {tree}; {SETUP}")


def check_convertible(architectures: list[str], tree: Path) -> None:
    known = known_architectures(tree)
    if not any(a in known for a in architectures):
        raise LQLoRAInputError(
            f"llama.cpp's converter does not know the architecture {', '.join(architectures) or '(none)'}; "
            "export it with --format hf (merged weights) or --format peft instead"
        )


def convert(folder: Path, out: Path, outtype: str = "f32", log=print) -> list[str]:
    """Write `out` from the HF folder; returns what the converter said that the export
    should record (an unrecognised pre-tokenizer)."""
    tree = converter_tree()
    cmd = [sys.executable, str(RUNNER), str(tree), str(folder), "--outtype", outtype, "--outfile", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not out.is_file():
        tail = "\n".join(done.stderr.strip().splitlines()[-6:])
        raise RuntimeError(f"llama.cpp's converter failed on {folder}:\n{tail}")
    notes = [line for line in done.stderr.splitlines() if line.startswith("lqlora:")]
    for line in notes:
        log(line)
    return notes
