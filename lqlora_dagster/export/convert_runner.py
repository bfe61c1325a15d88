"""Run llama.cpp's convert_hf_to_gguf.py from its source tree, as a script of its own
(`python convert_runner.py TREE ARGS...`): it imports that tree's `gguf` and
`conversion` packages, never lqlora_dagster's environment of them.

One change to the converter: a BPE tokenizer whose pre-tokenizer it does not recognise
(a model newer than the tree, or a tokenizer trained by the user) is written with
llama.cpp's default pre-tokenizer instead of stopping the export; a line on stderr says
so, and the export records it.
"""

import runpy
import sys

UNKNOWN = "lqlora: unknown BPE pre-tokenizer, written as 'default'"


def main() -> None:
    tree, args = sys.argv[1], sys.argv[2:]
    sys.path[:0] = [tree, f"{tree}/gguf-py"]
    import conversion.base as base  # the tree's own converter package

    recognise = base.TextModel.get_vocab_base_pre

    def tolerant(self, tokenizer) -> str:
        try:
            return recognise(self, tokenizer)
        except NotImplementedError:
            print(UNKNOWN, file=sys.stderr, flush=True)
            return "default"

    base.TextModel.get_vocab_base_pre = tolerant
    sys.argv = [f"{tree}/convert_hf_to_gguf.py", *args]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
