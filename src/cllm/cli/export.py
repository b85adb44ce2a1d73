"""`cllm export`: write a checkpoint in another format."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from cllm.cli._common import (
    DRY_RUN_OPTION,
    FORCE_OPTION,
    JSON_OPTION,
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
    ckpt, spec = open_spec(checkpoint)
    params = cfg.to_dict()
    pid = provenance_id(ckpt.sha256, "export", params)
    out = output or default_output(
        spec.path, spec.is_alias, spec.text, "export", pid, cfg.extension
    )
    if dry_run:
        emit_plan(out, params, use_json(as_json))
        return
    if _reused(out, pid, to, params, ckpt.sha256, force, output is None, as_json):
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


def _reused(
    out: Path,
    pid: str,
    fmt: str,
    params: dict,
    parent: str,
    force: bool,
    named: bool,
    as_json: bool,
) -> bool:
    """Make-friendly: an output already at `out` with the same provenance id is reported
    again instead of rebuilt (True); one made otherwise is overwritten, with a warning
    when cllm chose the name."""
    if not out.exists() or force:
        return False
    if _existing_provenance(out).get("id") == pid:
        log(f"{out} is up to date (same input and parameters); --force redoes it")
        emit_artifact(out, fmt, "export", params, parent, use_json(as_json))
        return True
    if named:
        warn(f"{out} exists with other provenance; overwriting")
    return False


def _existing_provenance(out: Path) -> dict:
    """What made the file or folder already at `out` ({} when unreadable: not up to date)."""
    import json

    from cllm.formats.checkpoint import open_checkpoint
    from cllm.formats.onnx_io import is_onnx, read_side_file

    if is_onnx(out):
        return read_side_file(out).get("provenance") or {}
    if (out / "manifest.json").is_file():  # an edge bundle
        try:
            return json.loads((out / "manifest.json").read_text()).get("provenance") or {}
        except ValueError:
            return {}
    try:
        return open_checkpoint(out).provenance or {}
    except Exception:  # noqa: BLE001 - an unreadable file is simply not up to date
        return {}


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
    from cllm.formats.provenance import make_provenance, provenance_id

    if target is None:
        raise UsageError("--to bundle needs --target", "e.g. --target rpi5")
    cfg = BundleExportConfig(target=target, gguf_type=gguf_type)
    cfg.validate()
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
    if dry_run:
        emit_plan(out, params, use_json(as_json))
        return
    if _reused(out, pid, "bundle", params, parent_sha, force, output is None, as_json):
        return
    prov = make_provenance("export", params, parent_sha, parent_prov, str(source))
    with progress(f"bundle for {target}", None):
        report = write_bundle(ckpt, Path(source), cfg, out, prov)
    log(f"bundle: {report['model']} for {report['runtime']} on {target}; run it with sh run.sh")
    emit_artifact(out, "bundle", "export", params, parent_sha, use_json(as_json))
