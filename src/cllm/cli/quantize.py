"""`cllm quantize`: RTN, GPTQ and AWQ to packed safetensors or GGUF, and every llama.cpp type."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from cllm.cli._console import EVENTS, use_json
from cllm.cli._emit import emit_result
from cllm.cli._errors import handle_errors
from cllm.cli._options import (
    CALIB_DTYPE_OPTION,
    CALIB_OPTION,
    CALIB_SAMPLES_OPTION,
    CALIB_SEQLEN_OPTION,
    DRY_RUN_OPTION,
    FORCE_OPTION,
    JSON_OPTION,
    SEED_OPTION,
    SENSITIVITY_CHUNKS_OPTION,
    output_option,
)


class Method(str, Enum):
    rtn = "rtn"
    gptq = "gptq"
    awq = "awq"


class AWQThen(str, Enum):
    rtn = "rtn"
    gptq = "gptq"


class To(str, Enum):
    safetensors = "safetensors"
    gguf = "gguf"


def quantize_cmd(
    checkpoint: str = typer.Argument(..., help="Model path, alias, or '-' for stdin."),
    method: Method = typer.Option(
        Method.rtn, "--method", "-m", help="rtn (no data), gptq or awq (calibrated)."
    ),
    bits: int = typer.Option(4, "--bits", "-b", help="Bits per weight for --to safetensors (2-8)."),
    group_size: int = typer.Option(
        128,
        "--group-size",
        "-g",
        help="Weights per scale: 32, 64, 128, 256, or -1 for per channel.",
    ),
    symmetric: bool = typer.Option(
        True, "--sym/--asym", help="Symmetric grid, or asymmetric with zero points."
    ),
    to: To = typer.Option(
        None,
        "--to",
        help="Output format [default: gguf if --gguf-type is given, else safetensors].",
    ),
    gguf_type: str = typer.Option(
        None,
        "--gguf-type",
        help="GGUF type: any llama.cpp type (Q8_0 ... Q2_K, K-quants, IQ types); GPTQ targets "
        "Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 and the K mixes (Q2_K ... Q6_K, with llama.cpp's per-tensor "
        "types), AWQ the legacy types.",
    ),
    fake: bool = typer.Option(
        False, "--fake", help="Write dense dequantized weights instead of packed integers."
    ),
    clip: bool = typer.Option(
        None,
        "--clip/--no-clip",
        help="Shrink each group's range where that lowers its rounding error (any grid, same format) [default: on for GPTQ, off for RTN].",
        show_default=False,
    ),
    keep: list[str] = typer.Option(
        [], "--keep", help="Regex of tensor names to leave unquantized (repeatable)."
    ),
    calib: Path = CALIB_OPTION,
    calib_samples: int = CALIB_SAMPLES_OPTION,
    calib_seqlen: int = CALIB_SEQLEN_OPTION,
    seed: int = SEED_OPTION,
    awq_then: AWQThen = typer.Option(
        AWQThen.rtn, "--awq-then", help="AWQ: quantize the scaled weights with rtn or gptq."
    ),
    awq_grid: int = typer.Option(
        20, "--awq-grid", help="AWQ: scale exponents tried, alpha = 0, 1/N, ..., (N-1)/N."
    ),
    act_order: bool = typer.Option(
        None,
        "--act-order/--no-act-order",
        help="GPTQ (and --awq-then gptq): visit columns by decreasing Hessian diagonal [default: on].",
        show_default=False,
    ),
    damp: float = typer.Option(
        0.01,
        "--damp",
        help="GPTQ (and --awq-then gptq): Hessian damping, as a fraction of its mean diagonal.",
    ),
    calib_dtype: str = CALIB_DTYPE_OPTION,
    resume: bool = typer.Option(
        False, "--resume", help="GPTQ/AWQ: continue a killed run from its last finished layer."
    ),
    sensitivity: bool = typer.Option(
        False,
        "--sensitivity",
        help="Measure each layer's KLD at each --candidates type; write JSON + PNG heat map.",
    ),
    candidates: str = typer.Option(
        "Q4_0,Q5_0,Q8_0",
        "--candidates",
        help="Types mixed precision chooses from (comma-separated); a --sensitivity map also "
        "takes int grids: INT2 ... INT8, group 128, or e.g. INT3G64.",
    ),
    sensitivity_chunks: int = SENSITIVITY_CHUNKS_OPTION,
    sensitivity_file: Path = typer.Option(
        None, "--sensitivity-file", help="Reuse a sensitivity JSON written by --sensitivity."
    ),
    target_bpw: float = typer.Option(
        None,
        "--target-bpw",
        help="Mixed precision: average bits per quantized weight (GGUF output).",
    ),
    target_size: str = typer.Option(
        None,
        "--target-size",
        help="Mixed precision: file size budget, e.g. 100MB or 104857600 (GGUF output).",
    ),
    imatrix: str = typer.Option(
        None,
        "--imatrix",
        help="Importance matrix for llama.cpp's quantizer: auto (from the calibration text) "
        "or a llama.cpp imatrix file (.gguf or .dat).",
    ),
    imatrix_out: Path = typer.Option(
        None,
        "--imatrix-out",
        help="Write the importance matrix computed from the calibration text (.gguf, or .dat "
        "for llama.cpp's legacy format); without --gguf-type, only the matrix is written.",
    ),
    output: Path = output_option("<stem>.quantize-<hash>[.gguf]"),
    force: bool = FORCE_OPTION,
    dry_run: bool = DRY_RUN_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Quantize a model's linear weights.

    RTN streams tensor by tensor; GPTQ and AWQ run layer by layer on calibration
    text, each layer seeing the outputs of the already-quantized layers before it.
    AWQ scales the weight columns of large-activation channels before quantizing
    (by RTN, or GPTQ with --awq-then gptq) and folds the inverse scales into the
    norms. Safetensors output is compressed-tensors "pack-quantized", which
    transformers loads directly; GGUF output from GPTQ or AWQ lies exactly on the
    llama.cpp type's grid.

    Example:

        cllm quantize smollm2-135m --method gptq --bits 4 --group-size 128

        cllm quantize smollm2-135m --method awq --bits 4 --group-size 128

        cllm quantize smollm2-135m --to gguf --gguf-type Q4_K_M

        cllm quantize smollm2-135m --gguf-type IQ4_XS --imatrix auto

        cllm quantize smollm2-135m --method gptq --gguf-type Q4_K_M

        cllm quantize smollm2-135m --imatrix-out smollm2.imatrix.gguf

        cllm quantize smollm2-135m --method gptq --gguf-type Q4_0 | cllm eval - -b llama.cpp --kld-base smollm2-135m
    """
    _quantize(
        checkpoint, method.value, bits, group_size, symmetric, to.value if to else None, gguf_type, fake, clip, keep,
        calib, calib_samples, calib_seqlen, seed, awq_then.value, awq_grid, act_order, damp, calib_dtype, resume,
        sensitivity, candidates, sensitivity_chunks, sensitivity_file, target_bpw, target_size,
        imatrix, imatrix_out, output, force, dry_run, as_json,
    )  # fmt: skip


@handle_errors("quantize")
def _quantize(
    checkpoint: str,
    method: str,
    bits: int,
    group_size: int,
    symmetric: bool,
    to: str | None,
    gguf_type: str | None,
    fake: bool,
    clip: bool | None,
    keep: list[str],
    calib: Path | None,
    calib_samples: int,
    calib_seqlen: int,
    seed: int,
    awq_then: str,
    awq_grid: int,
    act_order: bool | None,
    damp: float,
    calib_dtype: str,
    resume: bool,
    sensitivity: bool,
    candidates: str,
    sensitivity_chunks: int,
    sensitivity_file: Path | None,
    target_bpw: float | None,
    target_size: str | None,
    imatrix: str | None,
    imatrix_out: Path | None,
    output: Path | None,
    force: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    from cllm.core.job import Job, run_job
    from cllm.core.quantize.job import QuantizeRequest, QuantSensitivityJob, choose_job

    req = QuantizeRequest(
        method=method, bits=bits, group_size=group_size, symmetric=symmetric, to=to,
        gguf_type=gguf_type, fake=fake, clip=clip, keep=list(keep),
        calib=str(calib) if calib else None, calib_samples=calib_samples,
        calib_seqlen=calib_seqlen, seed=seed, awq_then=awq_then, awq_grid=awq_grid,
        act_order=act_order, damp=damp, calib_dtype=calib_dtype, resume=resume,
        candidates=candidates, sensitivity_chunks=sensitivity_chunks,
        sensitivity_file=str(sensitivity_file) if sensitivity_file else None,
        target_bpw=target_bpw, target_size=target_size,
        imatrix=imatrix.strip() if imatrix else None,
        imatrix_out=str(imatrix_out) if imatrix_out else None,
    )  # fmt: skip
    job: Job
    if sensitivity:
        job = QuantSensitivityJob(req, output)
    else:
        job, output = choose_job(req, output)
    result = run_job(
        job, checkpoint, output=output, force=force, dry_run=dry_run, resume=resume, events=EVENTS
    )
    emit_result(result, use_json(as_json))
