"""Taking a finetuned compressed model where models run: merged Hugging Face weights,
GGUF files for llama.cpp with an ILP-chosen mix of its types, PEFT adapters; and the
checks that score what was written in the runtime it is for."""
