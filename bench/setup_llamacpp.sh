#!/usr/bin/env bash
# Build llama.cpp's OpenAI-compatible server (llama-cpp-python[server]) into bench/.venv-llamacpp,
# the peer that bench/peers.py measures dashchat against.
#
#   bash bench/setup_llamacpp.sh            # once; bench/peers.py runs it when the venv is missing
#
# llama-cpp-python 0.3.x ships only an sdist on PyPI, so pip compiles llama.cpp: about 10-20 minutes
# on 2 cores. The build is tuned for this CPU and for a short compile: -march=native (GGML_NATIVE,
# so AVX2/FMA/F16C kernels on an AVX2 x86-64), OpenMP threads, and no tests, examples, tools or
# multimodal (llava/mtmd) library, which the server does not need for a text model.
#
# Environment: PYTHON (the interpreter to build the venv from; default python3),
#              LLAMACPP_VERSION (default below), VENV (default bench/.venv-llamacpp),
#              CMAKE_ARGS (appended to the flags below), JOBS (parallel compile jobs; default nproc).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-$here/.venv-llamacpp}"
LLAMACPP_VERSION="${LLAMACPP_VERSION:-0.3.36}"
JOBS="${JOBS:-$(nproc)}"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import llama_cpp.server" 2>/dev/null; then
    echo "llama-cpp-python already installed in $VENV: $("$VENV/bin/python" -c 'import llama_cpp; print(llama_cpp.__version__)')"
    exit 0
fi

echo "creating $VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip

flags="-DGGML_NATIVE=ON -DGGML_OPENMP=ON -DCMAKE_BUILD_TYPE=Release"
flags="$flags -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF"
flags="$flags -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF -DGGML_CCACHE=OFF"
export CMAKE_ARGS="$flags ${CMAKE_ARGS:-}"
export CMAKE_BUILD_PARALLEL_LEVEL="$JOBS"
echo "building llama-cpp-python==$LLAMACPP_VERSION with CMAKE_ARGS=$CMAKE_ARGS (jobs $JOBS); this takes minutes"
start=$(date +%s)
"$VENV/bin/python" -m pip install --verbose "llama-cpp-python[server]==$LLAMACPP_VERSION" \
    > "$VENV/build.log" 2>&1 || { tail -n 60 "$VENV/build.log"; echo "build failed; full log: $VENV/build.log" >&2; exit 1; }
echo "built in $(( $(date +%s) - start )) s; log: $VENV/build.log"
"$VENV/bin/python" -c "import llama_cpp, llama_cpp.server; print('llama-cpp-python', llama_cpp.__version__, llama_cpp.llama_print_system_info().decode())"
