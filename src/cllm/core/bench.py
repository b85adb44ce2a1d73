"""`cllm bench` as functions: each model measured in its own child process, then compared.

The measuring code is `cllm.standalone.runner` (the same file edge bundles ship), run as a
child so that each model's peak memory is its own and no runtime state leaks between runs.
This module adds what needs cllm: resolving checkpoints to something a runtime loads and
the weight bytes a generated token reads (the runner measures the machine's copy bandwidth
itself, so a remote board reports its own).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cllm.errors import NativeCrash, RuntimeFailure, UsageError
from cllm.formats.checkpoint import Checkpoint

BACKENDS = ("auto", "llama.cpp", "onnxruntime", "torch")


@dataclass(frozen=True)
class BenchConfig:
    backend: str = "auto"
    threads: int = 0  # 0: min(cores, 8)
    prompt: int = 128
    gen: int = 64
    repeat: int = 5
    warmup: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise UsageError(f"--backend {self.backend} is not known", "Use " + ", ".join(BACKENDS))
        for name, value, low in (("--prompt", self.prompt, 1), ("--gen", self.gen, 1),
                                 ("--repeat", self.repeat, 1), ("--warmup", self.warmup, 0),
                                 ("--threads", self.threads, 0)):  # fmt: skip
            if value < low:
                raise UsageError(f"{name} {value} is out of range", f"Use {low} or more")


def runnable(path: Path, ckpt: Checkpoint | None, backend: str) -> tuple[str, str]:
    """(backend, path the runtime loads) for a model: GGUF to llama.cpp, an ONNX export to
    onnxruntime, anything else to torch; `backend` overrides, converting to GGUF if needed."""
    from cllm.formats.onnx_io import is_onnx
    from cllm.standalone.runner import detect_backend

    auto = detect_backend(str(path))
    chosen = auto if backend == "auto" else backend
    if chosen == "onnxruntime" and not is_onnx(path):
        raise UsageError(
            f"{path} is not an ONNX export", f"Export it first: cllm export {path} --to onnx"
        )
    if chosen != "onnxruntime" and is_onnx(path):
        raise UsageError(f"{path} is an ONNX export: only --backend onnxruntime runs it")
    if chosen == "llama.cpp" and ckpt is not None and ckpt.format != "gguf":
        from cllm.core.eval.backends import gguf_for_llamacpp

        return chosen, str(gguf_for_llamacpp(ckpt))  # F32 GGUF, converted once and cached
    return chosen, str(ckpt.path if ckpt is not None else path)


def run_child(model: str, backend: str, cfg: BenchConfig, timeout: float = 3600) -> dict[str, Any]:
    """One runner process: its JSON record, or its one-line error as a RuntimeFailure.

    Where the CPU lists AMX and the probe let llama.cpp use it, a crash is most likely that
    path failing after all (seen on an Intel Xeon whose probe passed): the run is repeated
    once without the extra buffer types, as `cllm eval` does, and the warning says so."""
    try:
        return _run_child(model, backend, cfg, timeout, None)
    except NativeCrash as crash:
        from cllm.core.native import amx_retry_env

        if backend != "llama.cpp":
            raise
        return _run_child(model, backend, cfg, timeout, amx_retry_env(crash))


def _run_child(
    model: str, backend: str, cfg: BenchConfig, timeout: float, env: dict[str, str] | None
) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "cllm.standalone.runner", model, "--backend", backend,
        "--threads", str(cfg.threads), "--prompt", str(cfg.prompt), "--gen", str(cfg.gen),
        "--repeat", str(cfg.repeat), "--warmup", str(cfg.warmup),
    ]  # fmt: skip
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False, env=env
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeFailure(f"benchmark of {model} took over {timeout:.0f} s") from exc
    if proc.returncode < 0:  # the runtime took the runner down: say so in words
        raise NativeCrash(backend, f"benchmarking {model}", proc.returncode)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        raise RuntimeFailure(
            f"benchmark of {model} failed: {lines[-1] if lines else proc.returncode}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def weight_bytes_per_token(path: str, backend: str, ckpt: Checkpoint | None) -> int:
    """Bytes of weights one decode step reads: every weight matrix once, except an untied
    token-embedding table (a decode step reads one row of it)."""
    p = Path(path)
    if backend == "llama.cpp":
        from gguf import GGUFReader

        tensors = {t.name: int(t.n_bytes) for t in GGUFReader(p).tensors}
        if "output.weight" in tensors:
            tensors.pop("token_embd.weight", None)
        return sum(tensors.values())
    if backend == "onnxruntime":
        import onnx

        from cllm.formats.onnx_io import model_file

        model = onnx.load(str(model_file(p)), load_external_data=False)
        sizes = {i.name: _initializer_bytes(i) for i in model.graph.initializer}
        embed = [n for n in sizes if "embed_tokens" in n]
        if any("lm_head" in n for n in sizes):
            for n in embed:
                sizes.pop(n)
        return sum(sizes.values())
    assert ckpt is not None
    infos = ckpt.tensor_infos()
    total = sum(4 * i.numel for i in infos.values())  # torch holds fp32
    if "lm_head.weight" in infos and "model.embed_tokens.weight" in infos:
        total -= 4 * infos["model.embed_tokens.weight"].numel
    return total


def _initializer_bytes(t: Any) -> int:
    for entry in t.external_data:
        if entry.key == "length":
            return int(entry.value)
    return len(t.raw_data) if t.raw_data else 0
