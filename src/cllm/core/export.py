"""`cllm export` as a function: one checkpoint in, one file or folder out.

Targets: `gguf` (cllm's own writer), `safetensors` (HF folder or single file), `onnx`
(onnxruntime-genai's model builder); edge bundles (`cllm.core.bundle`) build on these. A target is a config dataclass plus a
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


ONNX_DTYPES = ("fp32", "fp16")
ONNX_QUANTS = ("none", "int8", "int4")
ONNX_BLOCKS = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class OnnxExportConfig:
    """A causal-LM decoder with KV cache for onnxruntime (CPU), optionally quantized."""

    dtype: str = "fp32"  # fp32 | fp16: weights and activations of the float graph
    quant: str = "none"  # none | int8 (onnxruntime dynamic quantization) | int4 (MatMulNBits)
    block_size: int = 32  # int4: weights per scale along the input dimension

    def to_dict(self) -> dict[str, Any]:
        return {"to": "onnx", **asdict(self)}

    @property
    def extension(self) -> str:
        return ".onnx"  # a folder: model.onnx + external data + genai_config.json + tokenizer

    def validate(self) -> None:
        if self.dtype not in ONNX_DTYPES:
            raise UsageError(f"--dtype {self.dtype} is not supported for ONNX", "Use fp32 or fp16")
        if self.quant not in ONNX_QUANTS:
            raise UsageError(f"--quant {self.quant} is not supported", "Use none, int8 or int4")
        if self.quant != "none" and self.dtype != "fp32":
            raise UsageError(
                f"--quant {self.quant} works on the fp32 graph",
                "Drop --dtype fp16 (quantized weights are dequantized to fp32 activations)",
            )
        if self.block_size not in ONNX_BLOCKS:
            raise UsageError(
                f"--block-size {self.block_size} is not supported",
                "Use " + ", ".join(str(b) for b in ONNX_BLOCKS),
            )


ExportConfig = GGUFExportConfig | SafetensorsExportConfig | OnnxExportConfig
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


def _plain_hf_folder(ckpt: Checkpoint) -> bool:
    """A float HF folder other tools can load as it is (no packed or GGUF weights)."""
    return (
        getattr(ckpt, "folder", None) is not None
        and ckpt.path.is_dir()
        and "quantization_config" not in ckpt.config
        and (ckpt.path / "tokenizer.json").is_file()
    )


def _export_onnx(
    ckpt: Checkpoint,
    cfg: OnnxExportConfig,
    out: Path,
    prov: dict[str, Any],
    progress: Progress | None,
) -> dict[str, Any]:
    """onnxruntime-genai's model builder on a float HF folder (written first when the input is
    GGUF, single-file or packed), then onnxruntime's dynamic int8 quantizer for `int8`."""
    import shutil

    from cllm.core.onnx_int4 import check_int4_source, packed_scheme, write_exact_int4
    from cllm.formats.atomic import atomic_path
    from cllm.formats.leftovers import make_temp_dir
    from cllm.formats.onnx_io import MODEL_FILE, check_graph, run_builder, write_provenance
    from cllm.formats.outputs import Kind
    from cllm.formats.save import plan_tensors, save_hf_folder

    # owned like atomic_path's temporaries, so one a killed run leaves is cleaned up next time
    work = make_temp_dir(out, "work-")
    try:
        if _plain_hf_folder(ckpt):
            hf = ckpt.path
        else:
            hf = work / "hf"
            save_hf_folder(
                hf, ckpt.config, plan_tensors(ckpt, "F32"), ckpt.tokenizer_dir(), prov,
                ckpt.gguf_kv,
            )  # fmt: skip
        precision = {"none": cfg.dtype, "int8": "fp32", "int4": "int4"}[cfg.quant]
        extra: dict[str, str] = {}
        scheme = packed_scheme(ckpt) if cfg.quant == "int4" else None
        if cfg.quant == "int4":
            block = check_int4_source(ckpt, cfg.block_size)  # a packed source keeps its groups
            symmetric = scheme[2] if scheme else True
            extra = {"block_size": str(block), "is_symmetric": str(symmetric).lower()}
        with atomic_path(out, Kind.ONNX) as tmp:
            run_builder(hf, tmp, precision, extra, work / "cache", work / "builder.log")
            if cfg.quant == "int8":
                _quantize_dynamic_int8(tmp, work)
            facts: dict[str, Any] = {"export": cfg.to_dict(), "source_format": ckpt.format}
            if scheme is not None:  # the checkpoint's own integers, not a re-quantization
                facts["exact_int4_tensors"] = write_exact_int4(tmp / MODEL_FILE, ckpt)
                facts["block_size_used"] = int(extra["block_size"])
            write_provenance(tmp, prov, facts)
            check_graph(tmp)  # a graph that fails the checker never reaches `out`
            if progress:
                progress("model.onnx")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "files": sorted(p.name for p in out.iterdir()),
        **{k: v for k, v in facts.items() if k != "export"},
    }


def _quantize_dynamic_int8(folder: Path, work: Path) -> None:
    """Every MatMul's weight to int8 (per channel), activations quantized at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from cllm.formats.onnx_io import MODEL_FILE

    src = folder / MODEL_FILE
    staged = work / "int8"
    staged.mkdir()
    quantize_dynamic(
        src, staged / MODEL_FILE, weight_type=QuantType.QInt8, per_channel=True,
        op_types_to_quantize=["MatMul"], use_external_data_format=True,
    )  # fmt: skip
    for old in (src, folder / (MODEL_FILE + ".data")):
        old.unlink(missing_ok=True)
    for f in staged.iterdir():
        f.replace(folder / f.name)


EXPORTERS: dict[type, Callable[..., dict[str, Any]]] = {
    GGUFExportConfig: _export_gguf,
    SafetensorsExportConfig: _export_safetensors,
    OnnxExportConfig: _export_onnx,
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
