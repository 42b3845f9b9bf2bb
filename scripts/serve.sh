#!/usr/bin/env bash
# Set up (if needed) and serve the embedded default model on http://127.0.0.1:8000.
#   bash scripts/serve.sh [extra flags, e.g. --port 9000 --model-path smollm2-135m-instruct]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python}" -m dashchat.openai_server "$@"
