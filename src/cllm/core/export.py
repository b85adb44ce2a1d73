"""`cllm export` as a function: one checkpoint in, one file or folder out.

Targets registered so far: `gguf` (cllm's own writer, numpy quantizers) and
`safetensors` (HF folder or single file). A target is a config dataclass plus a
handler in `EXPORTERS`; later targets (onnx, bundles) register the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cllm.errors import UsageError
from cllm.formats.checkpoint import Checkpoint


@dataclass(frozen=True)
class GGUFExportConfig:
    gguf_type: str = "F16"

    def to_dict(self) -> dict[str, Any]:
        return {"to": "gguf", **asdict(self)}

    @property
    def extension(self) -> str:
        return ".gguf"

    def validate(self) -> None:
        from cllm.formats.gguf_io import WRITABLE_TYPES

        if self.gguf_type not in WRITABLE_TYPES:
            raise UsageError(
                f"--gguf-type {self.gguf_type} is not one cllm export writes",
                "Choose one of "
                + ", ".join(WRITABLE_TYPES)
                + " (K-quants come with `cllm quantize`)",
            )


@dataclass(frozen=True)
class SafetensorsExportConfig:
    single_file: bool = False
    dtype: str | None = None  # F32, F16, BF16; None keeps float types (quantized -> F32)

    def to_dict(self) -> dict[str, Any]:
        return {"to": "safetensors", **asdict(self)}

    @property
    def extension(self) -> str:
        return ".safetensors" if self.single_file else ""

    def validate(self) -> None:
        if self.dtype is not None and self.dtype not in ("F32", "F16", "BF16"):
            raise UsageError(f"--dtype {self.dtype} is not supported", "Choose F32, F16 or BF16")


ExportConfig = GGUFExportConfig | SafetensorsExportConfig
Progress = Callable[[str], None]


def _export_gguf(
    ckpt: Checkpoint,
    cfg: GGUFExportConfig,
    out: Path,
    prov: dict[str, Any],
    progress: Progress | None,
) -> dict[str, Any]:
    from cllm.formats.save import save_gguf

    counts = save_gguf(out, ckpt, cfg.gguf_type, prov, progress)
    return {"types": counts}


def _export_safetensors(
    ckpt: Checkpoint,
    cfg: SafetensorsExportConfig,
    out: Path,
    prov: dict[str, Any],
    progress: Progress | None,
) -> dict[str, Any]:
    from cllm.formats.save import plan_tensors, save_hf_folder, save_single_file

    plans = plan_tensors(ckpt, cfg.dtype, progress)
    save = save_single_file if cfg.single_file else save_hf_folder
    save(out, ckpt.config, plans, ckpt.tokenizer_dir(), prov, ckpt.gguf_kv)
    return {}


EXPORTERS: dict[type, Callable[..., dict[str, Any]]] = {
    GGUFExportConfig: _export_gguf,
    SafetensorsExportConfig: _export_safetensors,
}


def export(
    ckpt: Checkpoint,
    cfg: ExportConfig,
    out: Path,
    provenance: dict[str, Any],
    progress: Progress | None = None,
) -> dict[str, Any]:
    cfg.validate()
    return EXPORTERS[type(cfg)](ckpt, cfg, out, provenance, progress)
