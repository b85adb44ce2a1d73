#!/usr/bin/env bash
# Create the peer venv for llama-cpp-python's OpenAI-style server at
# bench/peers/llamacpp-server/.venv: the server lm-eval's `gguf` model talks to over HTTP,
# which `bench/tasks.py --http` measures against cllm's in-process llama.cpp scoring.
#
#   bash bench/peers/setup_llamacpp_server.sh            # create if missing
#   bash bench/peers/setup_llamacpp_server.sh --force    # delete and recreate
#
# Pinned: llama-cpp-python 0.3.36 (= cllm's) with its [server] extra. pip reuses the wheel
# it built for cllm, so this takes seconds once cllm is installed.
# Never touches cllm's own venv.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VENV:-$HERE/llamacpp-server/.venv}"
PYTHON="${PYTHON:-python3}"
if [ "${1:-}" = "--force" ]; then rm -rf "$VENV"; fi
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import llama_cpp.server" 2>/dev/null; then
  echo "peer venv ready: $VENV" >&2; exit 0
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "llama-cpp-python[server]==0.3.36"
"$VENV/bin/python" -c "import llama_cpp, llama_cpp.server; print('llama-cpp-python', llama_cpp.__version__)" >&2
