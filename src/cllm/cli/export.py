"""`cllm export`: write a checkpoint in another format."""

from __future__ import annotations

from enum import Enum
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from cllm.cli._common import (
    DRY_RUN_OPTION,
    FORCE_OPTION,
    JSON_OPTION,
    claim_output,
    default_output,
    emit_artifact,
    emit_plan,
    handle_errors,
    log,
    output_option,
    progress,
    use_json,
    warn,
)
from cllm.errors import UsageError

if TYPE_CHECKING:
    from cllm.formats.outputs import Kind


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
    from cllm.cli.resolve import open_spec
    from cllm.core.export import (
        ExportConfig,
        GGUFExportConfig,
        OnnxExportConfig,
        SafetensorsExportConfig,
        export,
    )
    from cllm.formats.outputs import check_output
    from cllm.formats.provenance import make_provenance, provenance_id

    cfg: ExportConfig
    if to == "bundle":
        if single_file or dtype or quant != "none" or block_size != 32:
            raise UsageError(
                "--single-file, --dtype, --quant and --block-size do not apply to bundles"
            )
        _bundle(checkpoint, target, gguf_type, output, force, dry_run, as_json)
        return
    if target is not None:
        raise UsageError("--target applies to --to bundle only")
    if to != "onnx" and (quant != "none" or block_size != 32):
        raise UsageError("--quant and --block-size apply to --to onnx only")
    if to == "gguf":
        if single_file or dtype:
            raise UsageError("--single-file and --dtype apply to --to safetensors/onnx only")
        cfg = GGUFExportConfig(gguf_type=gguf_type)
    elif to == "onnx":
        if single_file:
            raise UsageError("--single-file applies to --to safetensors only")
        cfg = OnnxExportConfig(dtype=(dtype or "fp32").lower(), quant=quant, block_size=block_size)
    else:
        cfg = SafetensorsExportConfig(
            single_file=single_file, dtype=dtype.upper() if dtype else None
        )
    cfg.validate()
    kind = export_kind(to, single_file)
    if output is not None:  # refused before the input is even hashed
        check_output(output, kind, f"-o {output}")
    ckpt, spec = open_spec(checkpoint)
    params = cfg.to_dict()
    pid = provenance_id(ckpt.sha256, "export", params)
    out = output or default_output(
        spec.path, spec.is_alias, spec.text, "export", pid, cfg.extension
    )
    check = check_output(out, kind, f"-o {output}" if output is not None else None)
    if dry_run:
        emit_plan(out, params, use_json(as_json))
        return
    emit = partial(emit_artifact, out, to, "export", params, ckpt.sha256, use_json(as_json))
    if claim_output([check], pid, force, output is None, emit):
        return
    prov = make_provenance("export", params, ckpt.sha256, ckpt.provenance, str(ckpt.path))
    n = 1 if to == "onnx" else len(ckpt.tensor_infos())
    with progress(f"export to {to}", n) as advance:
        report = export(ckpt, cfg, out, prov, progress=lambda _name: advance())
    types = report.get("types") or {}
    if to == "gguf" and types:
        fallback = {k: v for k, v in types.items() if k not in (gguf_type, "F32")}
        if fallback:
            warn(
                f"some tensors could not use {gguf_type} (row length not a multiple of its block): {fallback}"
            )
        log("tensor types: " + ", ".join(f"{k} {v}" for k, v in types.items()), level=1)
    emit_artifact(out, to, "export", params, ckpt.sha256, use_json(as_json))


def export_kind(to: str, single_file: bool) -> Kind:
    """The kind of output `--to` writes: what an existing output at -o must be to be replaced."""
    from cllm.formats.outputs import Kind

    if to == "safetensors":
        return Kind.SAFETENSORS_FILE if single_file else Kind.HF_FOLDER
    return {"gguf": Kind.GGUF, "onnx": Kind.ONNX, "bundle": Kind.BUNDLE}[to]


def _bundle(
    checkpoint: str,
    target: str | None,
    gguf_type: str,
    output: Path | None,
    force: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    from cllm.cli.resolve import read_spec
    from cllm.core.bundle import BundleExportConfig, check_expressible, write_bundle
    from cllm.formats.checkpoint import open_checkpoint
    from cllm.formats.hashing import artifact_files, files_sha256
    from cllm.formats.onnx_io import is_onnx, read_side_file
    from cllm.formats.outputs import Kind, check_output
    from cllm.formats.provenance import make_provenance, provenance_id

    if target is None:
        raise UsageError("--to bundle needs --target", "e.g. --target rpi5")
    cfg = BundleExportConfig(target=target, gguf_type=gguf_type)
    cfg.validate()
    if output is not None:  # refused before the input is even hashed
        check_output(output, Kind.BUNDLE, f"-o {output}")
    spec = read_spec(checkpoint)
    if is_onnx(spec.path):
        ckpt = None
        parent_sha = files_sha256(artifact_files(spec.path))
        parent_prov = read_side_file(spec.path).get("provenance")
        source = spec.path
    else:
        ckpt = open_checkpoint(spec.text)
        parent_sha, parent_prov, source = ckpt.sha256, ckpt.provenance, ckpt.path
    check_expressible(ckpt, cfg)  # before any work
    params = cfg.to_dict()
    pid = provenance_id(parent_sha, "export", params)
    out = output or default_output(
        spec.path, spec.is_alias, spec.text, "export", pid, cfg.extension
    )
    check = check_output(out, Kind.BUNDLE, f"-o {output}" if output is not None else None)
    if dry_run:
        emit_plan(out, params, use_json(as_json))
        return
    emit = partial(emit_artifact, out, "bundle", "export", params, parent_sha, use_json(as_json))
    if claim_output([check], pid, force, output is None, emit):
        return
    prov = make_provenance("export", params, parent_sha, parent_prov, str(source))
    with progress(f"bundle for {target}", None):
        report = write_bundle(ckpt, Path(source), cfg, out, prov)
    log(f"bundle: {report['model']} for {report['runtime']} on {target}; run it with sh run.sh")
    emit_artifact(out, "bundle", "export", params, parent_sha, use_json(as_json))
