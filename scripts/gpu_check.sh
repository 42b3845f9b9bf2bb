#!/usr/bin/env bash
# On a machine with a CUDA GPU and dashchat's dependencies: the CUDA engine tests, the quick-start
# served on CUDA and checked with the seed's test script, and bench/engine.py on CUDA against
# transformers. Results go to $OUT (default /tmp/gpu_check).
#   MODEL=smollm2-135m-instruct bash scripts/gpu_check.sh
# Where weights cannot travel, give MODEL a folder with only config and tokenizer files: it gets
# random weights first (bench/random_model.py; speed does not depend on their values).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python}"
MODEL="${MODEL:-smollm2-135m-instruct}"
OUT="${OUT:-/tmp/gpu_check}"
PORT="${PORT:-8000}"
mkdir -p "$OUT"
nvidia-smi -L
"$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'

if [ -d "$MODEL" ] && ! ls "$MODEL"/*.safetensors >/dev/null 2>&1; then
  "$PY" bench/random_model.py "$MODEL" "$MODEL" --device cuda
fi

echo "== CUDA engine tests"
timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/engine/test_cuda.py 2>&1 | tee "$OUT/pytest_cuda.log" | tail -3

echo "== quick-start on CUDA"
"$PY" -m dashchat.openai_server --model-path "$MODEL" --device cuda --device-list 0 \
  --host 127.0.0.1 --port "$PORT" --served-model-name gpu-check > "$OUT/server.log" 2>&1 &
server=$!
for _ in $(seq 180); do curl -sf "127.0.0.1:$PORT/health" >/dev/null && break; sleep 1; done
timeout 120 "$PY" tests/openai_server/test_openai_server.py --host 127.0.0.1 --port "$PORT" --model gpu-check \
  2>&1 | tail -4
kill "$server"; wait "$server"

echo "== bench/engine.py on CUDA"
timeout 300 "$PY" bench/engine.py --model "$MODEL" --device cuda --peers transformers \
  --concurrency 1,8,32,128 --repeats 3 --json "$OUT/bench_cuda.json" 2>&1 | grep -A12 "^model"
