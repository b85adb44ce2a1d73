#!/usr/bin/env bash
# Create the peer venv for TRL (Hugging Face) at bench/peers/trl/.venv, for bench/distill.py.
#
#   bash bench/peers/setup_trl.sh            # create if missing or incomplete
#   bash bench/peers/setup_trl.sh --force    # delete and recreate
#
# Pinned in requirements-trl.txt: trl 1.16.0, transformers 5.24.0, accelerate 1.16.0,
# datasets 5.2.0, with torch 2.13.0 CPU build (= cllm's torch) installed first from the
# local wheel; the constraint keeps any later requirement from replacing it with a CUDA build.
# Never touches cllm's own venv.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VENV:-$HERE/trl/.venv}"
PYTHON="${PYTHON:-python3}"
REQS="$HERE/requirements-trl.txt"
TORCH_VERSION=2.13.0
TRL_VERSION=1.16.0

if [[ "${1:-}" == "--force" ]]; then
    rm -rf "$VENV"
fi

check() {
    "$VENV/bin/python" - "$TRL_VERSION" <<'PY'
import sys
import torch, trl
assert trl.__version__ == sys.argv[1], trl.__version__
assert torch.__version__.endswith("+cpu"), torch.__version__
from trl.experimental.gkd import GKDTrainer  # noqa: F401 - the trainer bench/distill.py runs
print(f"trl {trl.__version__}, torch {torch.__version__}")
PY
}

if [[ -x "$VENV/bin/python" ]] && check >/dev/null 2>&1; then
    echo "peer venv already complete: $VENV"
    check 2>/dev/null | tail -1
    exit 0
fi

t_all=$(date +%s)
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check --no-input)
"${PIP[@]}" "torch==$TORCH_VERSION"
"$VENV/bin/python" -c "import torch, sys; v=torch.__version__; sys.exit(0 if v.endswith('+cpu') else 'not a CPU build of torch: ' + v)"
constraints=$(mktemp)
echo "torch==$TORCH_VERSION" > "$constraints"
"${PIP[@]}" -c "$constraints" -r "$REQS"
rm -f "$constraints"
check
echo "peer venv ready in $(( $(date +%s) - t_all )) s: $VENV ($(du -sh "$VENV" | cut -f1))"
