"""`cllm prune`: unstructured, N:M, structured width and depth pruning."""

from __future__ import annotations

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


def prune_cmd(
    checkpoint: str = typer.Argument(..., help="Model path, alias, or '-' for stdin."),
    method: str = typer.Option(
        None,
        "--method",
        "-m",
        help="Unstructured/N:M: magnitude (no data), wanda or sparsegpt [default: wanda].",
        show_default=False,
    ),
    sparsity: float = typer.Option(
        None,
        "--sparsity",
        "-s",
        help="Fraction of each pruned weight matrix set to zero, in [0, 1) [default: 0.5].",
        show_default=False,
    ),
    pattern: str = typer.Option(
        None, "--pattern", help="N:M sparsity: keep N of every M input weights (2:4, 4:8)."
    ),
    layers: str = typer.Option(
        None, "--layers", help="Decoder layers to prune, e.g. 4-25 or 0,2,5-7 [default: all]."
    ),
    keep: list[str] = typer.Option(
        [], "--keep", help="Regex of linear weights to leave dense (repeatable)."
    ),
    profile: str = typer.Option(
        "uniform",
        "--profile",
        help="Per-layer sparsity: uniform, owl (outlier-weighted), or a --sensitivity JSON.",
    ),
    owl_m: float = typer.Option(
        5.0, "--owl-m", help="OWL: outlier threshold, in multiples of the layer's mean score."
    ),
    owl_lambda: float = typer.Option(
        0.08, "--owl-lambda", help="OWL / profile file: per-layer sparsity within target +- this."
    ),
    structured: str = typer.Option(
        None,
        "--structured",
        help="Remove whole units: mlp (FFN channels), heads (GQA-aware) or hidden (embedding channels).",
    ),
    ratio: float = typer.Option(
        None, "--ratio", help="--structured: fraction of units removed in every layer."
    ),
    drop_layers: int = typer.Option(None, "--drop-layers", help="Remove this many decoder layers."),
    layer_metric: str = typer.Option(
        "block-influence",
        "--layer-metric",
        help="--drop-layers: block-influence, angular-distance (a contiguous block) or last.",
    ),
    dequantize: bool = typer.Option(
        False, "--dequantize", help="Structured/depth pruning of a quantized input: float output."
    ),
    sensitivity: bool = typer.Option(
        False,
        "--sensitivity",
        help="Measure KLD with one sublayer of one layer pruned at a time; write JSON + PNG heat map.",
    ),
    sensitivity_chunks: int = SENSITIVITY_CHUNKS_OPTION,
    calib: Path = CALIB_OPTION,
    calib_samples: int = CALIB_SAMPLES_OPTION,
    calib_seqlen: int = CALIB_SEQLEN_OPTION,
    seed: int = SEED_OPTION,
    calib_dtype: str = CALIB_DTYPE_OPTION,
    damp: float = typer.Option(
        0.01, "--damp", help="SparseGPT: Hessian damping, as a fraction of its mean diagonal."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Wanda/SparseGPT: continue a killed run from its last layer."
    ),
    output: Path = output_option("<stem>.prune-<hash>"),
    force: bool = FORCE_OPTION,
    dry_run: bool = DRY_RUN_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Prune a model: zero weights (unstructured, N:M) or remove whole units and layers.

    Wanda and SparseGPT run layer by layer on calibration text, each layer seeing the
    outputs of the already-pruned layers before it. Unstructured output is the same
    architecture with exact zeros (dense safetensors; `cllm quantize` keeps them zero).
    Structured and depth pruning write a smaller standard config that transformers,
    llama.cpp and onnxruntime load unchanged.

    Example:

        cllm prune smollm2-135m --method wanda --sparsity 0.5

        cllm prune smollm2-135m --method sparsegpt --pattern 2:4

        cllm prune smollm2-135m --method wanda --sparsity 0.7 --profile owl

        cllm prune smollm2-135m --structured mlp --ratio 0.25

        cllm prune smollm2-135m --drop-layers 6 --layer-metric block-influence

        cllm prune smollm2-135m --structured mlp --ratio 0.25 | cllm quantize - --method gptq --gguf-type Q4_0 | cllm bench -
    """
    _prune(
        checkpoint, method, sparsity, pattern, layers, keep, profile, owl_m, owl_lambda,
        structured, ratio, drop_layers, layer_metric, dequantize, sensitivity,
        sensitivity_chunks, calib, calib_samples, calib_seqlen, seed, calib_dtype, damp, resume,
        output, force, dry_run, as_json,
    )  # fmt: skip


@handle_errors("prune")
def _prune(
    checkpoint: str,
    method: str | None,
    sparsity: float | None,
    pattern: str | None,
    layers: str | None,
    keep: list[str],
    profile: str,
    owl_m: float,
    owl_lambda: float,
    structured: str | None,
    ratio: float | None,
    drop_layers: int | None,
    layer_metric: str,
    dequantize: bool,
    sensitivity: bool,
    sensitivity_chunks: int,
    calib: Path | None,
    calib_samples: int,
    calib_seqlen: int,
    seed: int,
    calib_dtype: str,
    damp: float,
    resume: bool,
    output: Path | None,
    force: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    from cllm.core.job import Job, run_job
    from cllm.core.prune.job import PruneJob, PruneRequest, PruneSensitivityJob

    req = PruneRequest(
        method=method, sparsity=sparsity, pattern=pattern, layers=layers, keep=list(keep),
        profile=profile, owl_m=owl_m, owl_lambda=owl_lambda, structured=structured, ratio=ratio,
        drop_layers=drop_layers, layer_metric=layer_metric, dequantize=dequantize, damp=damp,
        calib=str(calib) if calib else None, calib_samples=calib_samples,
        calib_seqlen=calib_seqlen, seed=seed, calib_dtype=calib_dtype, resume=resume,
        sensitivity_chunks=sensitivity_chunks,
    )  # fmt: skip
    job: Job = PruneSensitivityJob(req, output) if sensitivity else PruneJob(req)
    result = run_job(
        job, checkpoint, output=output, force=force, dry_run=dry_run, resume=resume, events=EVENTS
    )
    emit_result(result, use_json(as_json))
