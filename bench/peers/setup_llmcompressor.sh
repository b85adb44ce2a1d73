#!/usr/bin/env bash
# Create the peer venv for llm-compressor (vLLM project) at bench/peers/llmcompressor/.venv.
#
#   bash bench/peers/setup_llmcompressor.sh            # create if missing or incomplete
#   bash bench/peers/setup_llmcompressor.sh --force    # delete and recreate
#   VENV=/some/dir bash bench/peers/setup_llmcompressor.sh   # elsewhere (testing)
#
# Pinned: llmcompressor 0.14.0.1, compressed-tensors 0.19.0, transformers 5.17.0
# (llmcompressor 0.14.0.1 requires transformers >=5.15,<=5.17 and torch >=2.10,<=2.14.0),
# torch 2.13.0 CPU build (= cllm's torch). Every version is in requirements-llmcompressor.txt.
#
# torch is installed first, on its own: on this project's machines `pip install torch==2.13.0`
# takes the CPU wheel (2.13.0+cpu) lying on local disk. A plain `torch` requirement resolved
# from PyPI would pull a CUDA build of several GB. PyTorch's own CPU wheel index is not
# reachable here (name resolution fails); on a machine without the local wheel that does
# reach it, set TORCH_INDEX_URL to that index. The script refuses a non-CPU torch.
#
# Measured on 2026-12-01 (2 cores, Python 3.11.7): torch 44 s, the rest (57 packages in all,
# 27 downloaded from PyPI, the rest from local wheel folders) 66 s; about 2 min in all on a
# quiet machine, 4.5 min (107 s + 124 s + venv) with other jobs loading both cores; 1.5 GB.
#
# Never touches cllm's own venv (/work/main/.venv).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VENV:-$HERE/llmcompressor/.venv}"
PYTHON="${PYTHON:-python3}"
REQS="$HERE/requirements-llmcompressor.txt"
TORCH_VERSION=2.13.0
LLMC_VERSION=0.14.0.1

if [[ "${1:-}" == "--force" ]]; then
    rm -rf "$VENV"
fi

check() {
    "$VENV/bin/python" - "$LLMC_VERSION" <<'EOF'
import sys
import torch, llmcompressor
assert llmcompressor.__version__ == sys.argv[1], llmcompressor.__version__
assert torch.__version__.endswith("+cpu"), torch.__version__
print(f"llmcompressor {llmcompressor.__version__}, torch {torch.__version__}")
EOF
}

if [[ -x "$VENV/bin/python" ]] && check >/dev/null 2>&1; then
    echo "peer venv already complete: $VENV"
    check 2>/dev/null | tail -1
    exit 0
fi

"$PYTHON" - <<'EOF'
import sys
if sys.version_info[:2] != (3, 11):
    sys.exit(f"need Python 3.11 (the CPU torch wheel is cp311), got {sys.version.split()[0]}")
EOF

t_all=$(date +%s)
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check --no-input)

t=$(date +%s)
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    "${PIP[@]}" --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"
else
    "${PIP[@]}" "torch==$TORCH_VERSION"
fi
"$VENV/bin/python" -c "import torch, sys; v=torch.__version__; print('torch', v); sys.exit(0 if v.endswith('+cpu') else 'not a CPU build of torch: ' + v)"
echo "torch installed in $(( $(date +%s) - t )) s"

t=$(date +%s)
# torch==2.13.0 is pinned in the requirements too, so nothing can replace the CPU build.
"${PIP[@]}" -r "$REQS"
echo "llmcompressor and dependencies installed in $(( $(date +%s) - t )) s"

check
echo "peer venv ready in $(( $(date +%s) - t_all )) s: $VENV ($(du -sh "$VENV" | cut -f1))"
