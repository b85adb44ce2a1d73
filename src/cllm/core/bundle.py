"""Edge bundles: a folder to copy to a board and run there with only its runtime installed.

    model.gguf | model.onnx/   the model in the format the board's runtime takes
    manifest.json             model hash and size, provenance, runtime and version, threads
    bench.py                  cllm.standalone.runner, verbatim (stdlib + numpy + the runtime)
    guard.py                  cllm.standalone.guard, which bench.py imports from beside itself
    energy.py                 cllm.standalone.energy: joules per token where the board reports power
    run.sh                    runs bench.py with the target's settings; prints cllm.bench/1 JSON
    README.txt                what to install on the board and how to run it

Boards with a CPU runtime (Raspberry Pi 5, generic arm64, x86) get GGUF for llama.cpp; a
Jetson gets ONNX for onnxruntime with the CUDA provider named (TensorRT where installed).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cllm.errors import UsageError
from cllm.formats.checkpoint import Checkpoint
from cllm.standalone import shipped_files

FLOAT_TYPES = {"F32", "F16", "BF16"}


@dataclass(frozen=True)
class BoardTarget:
    name: str
    runtime: str  # llama.cpp | onnxruntime
    package: str  # what to pip install on the board
    threads: int  # 0: the runner's default, min(cores, 8)
    providers: tuple[str, ...] = ()  # onnxruntime execution providers, in order of preference
    note: str = ""


TARGETS = {
    "rpi5": BoardTarget(
        "rpi5", "llama.cpp", "llama-cpp-python", 4,
        note="Raspberry Pi 5 (4x Cortex-A76); run with a cooler: vcgencmd get_throttled is recorded",
    ),
    "generic-arm64": BoardTarget("generic-arm64", "llama.cpp", "llama-cpp-python", 0),
    "x86": BoardTarget("x86", "llama.cpp", "llama-cpp-python", 0),
    "jetson-orin": BoardTarget(
        "jetson-orin", "onnxruntime", "onnxruntime-gpu (NVIDIA's JetPack build)", 0,
        providers=("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
        note="power mode (nvpmodel -q) is recorded; set it first, e.g. sudo nvpmodel -m 0",
    ),
}  # fmt: skip


@dataclass(frozen=True)
class BundleExportConfig:
    target: str = "generic-arm64"
    gguf_type: str = "F16"  # llama.cpp targets: the type a float input is converted to
    prompt: int = 128
    gen: int = 64
    repeat: int = 5

    def to_dict(self) -> dict[str, Any]:
        return {"to": "bundle", **asdict(self)}

    @property
    def extension(self) -> str:
        return ".bundle"

    def validate(self) -> None:
        if self.target not in TARGETS:
            raise UsageError(f"unknown target {self.target}", "Choose one of " + ", ".join(TARGETS))
        if TARGETS[self.target].runtime == "llama.cpp":
            from cllm.core.export import GGUFExportConfig

            GGUFExportConfig(self.gguf_type).validate()


def check_expressible(ckpt: Checkpoint | None, cfg: BundleExportConfig) -> None:
    """Refuse a checkpoint whose stored quantization the target's format cannot hold, rather
    than silently dequantizing it (the bundle would be larger and not what was benchmarked)."""
    board = TARGETS[cfg.target]
    if ckpt is None or board.runtime != "onnxruntime":
        return
    stored = sorted({i.dtype for i in ckpt.tensor_infos().values()} - FLOAT_TYPES)
    if stored:
        raise UsageError(
            f"{cfg.target} runs ONNX, which cannot hold this model's {'/'.join(stored)} weights",
            "Bundle the unquantized model (it is exported to ONNX fp16), or use a llama.cpp "
            "target (rpi5, generic-arm64, x86)",
        )


def write_bundle(
    ckpt: Checkpoint | None,
    source: Path,
    cfg: BundleExportConfig,
    out: Path,
    prov: dict[str, Any],
) -> dict[str, Any]:
    """The bundle folder, written atomically: nothing at `out` unless every piece is there."""
    from cllm.formats.atomic import atomic_path
    from cllm.formats.hashing import artifact_files, files_sha256
    from cllm.formats.outputs import Kind

    board = TARGETS[cfg.target]
    check_expressible(ckpt, cfg)
    with atomic_path(out, Kind.BUNDLE) as tmp:
        tmp.mkdir()
        if board.runtime == "llama.cpp":
            model = tmp / "model.gguf"
            _gguf_into(ckpt, source, cfg, model, prov)
        else:
            model = tmp / "model.onnx"
            _onnx_into(ckpt, source, model, prov)
        runner, *beside = shipped_files()  # the runner imports the others from beside itself
        shutil.copy(runner, tmp / "bench.py")
        for f in beside:
            shutil.copy(f, tmp / f.name)
        files = artifact_files(model)
        manifest = {
            "schema": "cllm.bundle/1",
            "target": cfg.target,
            "note": board.note,
            "model": {
                "path": model.name,
                "format": "gguf" if board.runtime == "llama.cpp" else "onnx",
                "bytes": sum(f.stat().st_size for f in files),
                "sha256": files_sha256(files),
            },
            "runtime": {
                "name": board.runtime,
                "install": f"pip install {board.package}" if "(" not in board.package else board.package,
                "built_with": _runtime_version(board.runtime),
                "providers": list(board.providers),
            },
            "threads": board.threads,
            "bench": {"prompt": cfg.prompt, "gen": cfg.gen, "repeat": cfg.repeat},
            "provenance": prov,
        }  # fmt: skip
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        run = tmp / "run.sh"
        run.write_text(_run_script(board, model.name, cfg))
        run.chmod(0o755)
        (tmp / "README.txt").write_text(_readme(board, model.name))
    return {"target": cfg.target, "model": model.name, "runtime": board.runtime}


def _gguf_into(
    ckpt: Checkpoint | None, source: Path, cfg: BundleExportConfig, dest: Path, prov: dict[str, Any]
) -> None:
    if source.suffix == ".gguf" and source.is_file():
        shutil.copyfile(source, dest)  # already the board's format: the exact bytes
        return
    from cllm.formats.save import save_gguf

    if ckpt is None:
        raise UsageError(f"{source} is ONNX; llama.cpp targets need a GGUF or float checkpoint")
    save_gguf(dest, ckpt, cfg.gguf_type, prov)


def _onnx_into(ckpt: Checkpoint | None, source: Path, dest: Path, prov: dict[str, Any]) -> None:
    from cllm.formats.onnx_io import is_onnx

    if is_onnx(source):
        shutil.copytree(source, dest)
        return
    from cllm.core.export import OnnxExportConfig, export

    assert ckpt is not None
    export(ckpt, OnnxExportConfig(dtype="fp16"), dest, prov)


def _runtime_version(runtime: str) -> str | None:
    from importlib import metadata

    dist = "llama-cpp-python" if runtime == "llama.cpp" else "onnxruntime"
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _run_script(board: BoardTarget, model: str, cfg: BundleExportConfig) -> str:
    providers = ",".join(board.providers)
    extra = f' --providers "{providers}"' if providers else ""
    return (
        "#!/bin/sh\n"
        f"# cllm bundle for {board.name}: benchmark {model} with {board.runtime}; prints one\n"
        "# JSON record (schema cllm.bench/1). Extra arguments go to bench.py (see --help).\n"
        'cd "$(dirname "$0")" || exit 1\n'
        f'exec "${{PYTHON:-python3}}" bench.py {model} --backend {board.runtime} '
        f"--threads {board.threads} --prompt {cfg.prompt} --gen {cfg.gen} "
        f'--repeat {cfg.repeat}{extra} "$@"\n'
    )


def _readme(board: BoardTarget, model: str) -> str:
    return (
        f"cllm bundle for {board.name}\n\n"
        f"On the board: {board.package if '(' in board.package else 'pip install ' + board.package}"
        " numpy\nthen: sh run.sh > result.json\n\n"
        f"{model} is the model; manifest.json says what it is and what made it; bench.py is the\n"
        "same measuring code `cllm bench` runs, so its JSON compares directly with local runs.\n"
        + (f"\n{board.note}\n" if board.note else "")
    )
