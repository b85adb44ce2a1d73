"""`cllm export`: write a checkpoint in another format."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from cllm.cli._console import EVENTS, use_json
from cllm.cli._emit import emit_result
from cllm.cli._errors import handle_errors
from cllm.cli._options import DRY_RUN_OPTION, FORCE_OPTION, JSON_OPTION, output_option
from cllm.errors import UsageError


class Target(str, Enum):
    gguf = "gguf"
    safetensors = "safetensors"
    onnx = "onnx"
    bundle = "bundle"


class OnnxQuant(str, Enum):
    none = "none"
    int8 = "int8"
    int4 = "int4"


def export_cmd(
    checkpoint: str = typer.Argument(..., help="Model path, alias, or '-' for stdin."),
    to: Target = typer.Option(..., "--to", help="Output format."),
    gguf_type: str = typer.Option(
        "F16", "--gguf-type", help="GGUF tensor type: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1."
    ),
    single_file: bool = typer.Option(
        False, "--single-file", help="safetensors: one file embedding config and tokenizer."
    ),
    dtype: str = typer.Option(
        None,
        "--dtype",
        help="safetensors: cast float tensors to F32, F16 or BF16; onnx: fp32 (default) or fp16.",
    ),
    quant: OnnxQuant = typer.Option(
        OnnxQuant.none,
        "--quant",
        help="onnx: int8 (onnxruntime dynamic quantization) or int4 (MatMulNBits blocks).",
    ),
    block_size: int = typer.Option(
        32, "--block-size", help="onnx --quant int4: weights per scale (16, 32, 64, 128, 256)."
    ),
    target: str = typer.Option(
        None,
        "--target",
        help="bundle: rpi5, jetson-orin, generic-arm64 or x86 (GGUF + llama.cpp; Jetson: ONNX).",
    ),
    output: Path = output_option("<stem>.export-<hash>.<ext>"),
    force: bool = FORCE_OPTION,
    dry_run: bool = DRY_RUN_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Convert a checkpoint to GGUF (llama.cpp), safetensors or ONNX (onnxruntime).

    Prints the path of what it wrote. An existing output with the same
    provenance is reused (Make-friendly) unless --force. ONNX output is a folder
    (model.onnx, its weights, genai_config.json, tokenizer): a decoder with a KV cache.

    Example:

        cllm export smollm2-135m --to gguf --gguf-type Q8_0

        cllm export model.gguf --to safetensors --single-file -o model.safetensors

        cllm export smollm2-135m --to onnx --quant int4 --block-size 32

        cllm export m.gguf --to bundle --target rpi5
    """
    _export(
        checkpoint, to.value, gguf_type.upper(), single_file, dtype, quant.value, block_size,
        target, output, force, dry_run, as_json,
    )  # fmt: skip


@handle_errors("export")
def _export(
    checkpoint: str,
    to: str,
    gguf_type: str,
    single_file: bool,
    dtype: str | None,
    quant: str,
    block_size: int,
    target: str | None,
    output: Path | None,
    force: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    from cllm.core.export import GGUFExportConfig, OnnxExportConfig, SafetensorsExportConfig
    from cllm.core.export_job import BundleJob, ExportJob
    from cllm.core.job import Job, run_job

    job: Job
    if to == "bundle":
        from cllm.core.bundle import BundleExportConfig

        if single_file or dtype or quant != "none" or block_size != 32:
            raise UsageError(
                "--single-file, --dtype, --quant and --block-size do not apply to bundles"
            )
        if target is None:
            raise UsageError("--to bundle needs --target", "e.g. --target rpi5")
        job = BundleJob(BundleExportConfig(target=target, gguf_type=gguf_type))
    else:
        if target is not None:
            raise UsageError("--target applies to --to bundle only")
        if to != "onnx" and (quant != "none" or block_size != 32):
            raise UsageError("--quant and --block-size apply to --to onnx only")
        if to == "gguf":
            if single_file or dtype:
                raise UsageError("--single-file and --dtype apply to --to safetensors/onnx only")
            job = ExportJob(GGUFExportConfig(gguf_type=gguf_type))
        elif to == "onnx":
            if single_file:
                raise UsageError("--single-file applies to --to safetensors only")
            job = ExportJob(
                OnnxExportConfig(
                    dtype=(dtype or "fp32").lower(), quant=quant, block_size=block_size
                )
            )
        else:
            job = ExportJob(
                SafetensorsExportConfig(
                    single_file=single_file, dtype=dtype.upper() if dtype else None
                )
            )
    result = run_job(job, checkpoint, output=output, force=force, dry_run=dry_run, events=EVENTS)
    emit_result(result, use_json(as_json))
