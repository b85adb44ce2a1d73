"""`cllm quantize`: RTN, GPTQ and AWQ to packed safetensors or GGUF, and every llama.cpp type."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
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
    from cllm.cli.resolve import Spec
    from cllm.core.quantize.sensitivity import SensitivityReport
    from cllm.formats.checkpoint import Checkpoint
    from cllm.formats.outputs import OutputCheck


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
        help="GGUF type: any llama.cpp type (Q8_0 ... Q2_K, K-quants, IQ4_NL...); GPTQ and AWQ target Q4_0/Q4_1/Q5_0/Q5_1/Q8_0.",
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
    calib: Path = typer.Option(
        None,
        "--calib",
        help="Calibration text [default: $CLLM_DATA_DIR/calibration/wikitext-2-valid.tokens].",
    ),
    calib_samples: int = typer.Option(128, "--calib-samples", help="Calibration sequences."),
    calib_seqlen: int = typer.Option(
        512, "--calib-seqlen", help="Tokens per calibration sequence."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for choosing calibration windows."),
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
    calib_dtype: str = typer.Option(
        "auto",
        "--calib-dtype",
        help="GPTQ/AWQ: calibration forward passes in auto (bf16 where the CPU has it), fp32 or bf16.",
    ),
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
        help="Types mixed precision chooses from (comma-separated).",
    ),
    sensitivity_chunks: int = typer.Option(
        2,
        "--sensitivity-chunks",
        help="512-token chunks of calibration text per sensitivity measurement.",
    ),
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

        cllm quantize smollm2-135m --method gptq --gguf-type Q4_0 | cllm eval - -b llama.cpp --kld-base smollm2-135m
    """
    _quantize(
        checkpoint, method.value, bits, group_size, symmetric, to.value if to else None, gguf_type, fake, clip, keep,
        calib, calib_samples, calib_seqlen, seed, awq_then.value, awq_grid, act_order, damp, calib_dtype, resume,
        sensitivity, candidates, sensitivity_chunks, sensitivity_file, target_bpw, target_size,
        output, force, dry_run, as_json,
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
    output: Path | None,
    force: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    from cllm.cli.resolve import open_spec
    from cllm.core.quantize.api import Target, quantize
    from cllm.core.quantize.methods import AWQConfig, GPTQConfig, MethodConfig, RTNConfig
    from cllm.formats.outputs import Kind, check_output
    from cllm.formats.provenance import make_provenance, provenance_id

    mixed = target_bpw is not None or target_size is not None
    if target_bpw is not None and target_size is not None:
        raise UsageError("give --target-bpw or --target-size, not both")
    if mixed and (gguf_type or to == "safetensors"):
        raise UsageError(
            "--target-bpw/--target-size choose GGUF types per layer themselves",
            "Drop --gguf-type / --to safetensors",
        )
    size_budget = parse_size(target_size) if target_size is not None else None
    target_to = to or ("gguf" if gguf_type or mixed else "safetensors")
    if target_to == "gguf" and not gguf_type and not mixed and not sensitivity:
        raise UsageError("--to gguf needs --gguf-type", "e.g. --gguf-type Q4_K_M")
    if target_to == "safetensors" and gguf_type:
        raise UsageError("--gguf-type applies to --to gguf only")
    if fake and target_to == "gguf":
        raise UsageError("--fake applies to --to safetensors only")
    target = Target(
        to=target_to, bits=bits, group_size=group_size, symmetric=symmetric,
        gguf_type=gguf_type.upper() if gguf_type else None, fake=fake, keep=list(keep),
    )  # fmt: skip
    layered = method in ("gptq", "awq")  # calibrated, layer by layer
    if method != "awq" and (awq_then != "rtn" or awq_grid != 20):
        raise UsageError("--awq-then and --awq-grid apply to --method awq only")
    cfg: MethodConfig
    if layered:
        from cllm.core.quantize.layerwise import resolve_compute_dtype

        if act_order is None:  # on wherever GPTQ runs: better at no cost in format or speed
            act_order = method == "gptq" or awq_then == "gptq"
        if method == "awq":
            if clip is not None:
                raise UsageError(
                    "--clip applies to --method rtn and gptq",
                    "AWQ searches its own scales; use --method gptq --clip",
                )
            cfg = AWQConfig(grid_points=awq_grid, then=awq_then, act_order=act_order, damp=damp,
                            calib=str(calib) if calib else None, calib_samples=calib_samples,
                            calib_seqlen=calib_seqlen, seed=seed, compute_dtype=calib_dtype)  # fmt: skip
        else:
            cfg = GPTQConfig(act_order=act_order, damp=damp, clip=clip is not False,
                             calib=str(calib) if calib else None,
                             calib_samples=calib_samples, calib_seqlen=calib_seqlen, seed=seed,
                             compute_dtype=calib_dtype)  # fmt: skip
        cfg.validate()
        cfg.compute_dtype = resolve_compute_dtype(cfg.compute_dtype)  # provenance records what ran
    else:
        if act_order is not None or resume:
            raise UsageError("--act-order and --resume apply to --method gptq or awq only")
        cfg = RTNConfig(clip=bool(clip))
    cands = [c.strip().upper() for c in candidates.split(",") if c.strip()]
    grid = None if mixed or sensitivity else target.grid(cfg)  # validates flags before heavy work
    kind = Kind.GGUF if target_to == "gguf" else Kind.HF_FOLDER
    if output is not None:  # refused before the input is read or anything is measured
        if sensitivity:
            _sensitivity_checks(output, output)
        else:
            check_output(output, kind, f"-o {output}")
    ckpt, spec = open_spec(checkpoint)
    if sensitivity:
        _write_sensitivity(
            ckpt, spec, cands, calib, sensitivity_chunks, seed, output, force, dry_run, as_json
        )
        return
    mixed_info: dict[str, object] = {}
    if mixed:
        from cllm.core.quantize.api import plan_layer_types
        from cllm.core.quantize.methods import select_tensors

        report_s, sens_sha = _load_or_measure(
            ckpt, cands, calib, sensitivity_chunks, seed, sensitivity_file
        )
        layer_types, stats = plan_layer_types(
            report_s, ckpt, select_tensors(ckpt, target.keep), target_bpw, size_budget
        )
        target.layer_types = layer_types
        mixed_info = {
            "sensitivity_sha256": sens_sha,
            "target_bpw": target_bpw,
            "target_size": size_budget,
            **stats,
        }
        log(
            f"mixed precision at {stats['bits_per_weight']:.3f} bits/weight: "
            + ", ".join(f"{t} x{layer_types.count(t)}" for t in sorted(set(layer_types)))
        )
    stored = {i.dtype for i in ckpt.tensor_infos().values()}
    already = sorted(stored - {"F32", "F16", "BF16"})
    if already:
        warn(
            f"{spec.text} is already quantized ({', '.join(already)}); its weights are dequantized first"
        )
    calibration = None
    if layered:
        from cllm.core.quantize.calib import default_calibration_file, load_calibration

        calibration = load_calibration(
            Path(calib) if calib else default_calibration_file(),
            ckpt.tokenizer_dir(),
            calib_samples,
            calib_seqlen,
            seed,
        )
    params: dict[str, object] = {"method": cfg.to_dict(), "target": target.to_dict()}
    if already:
        params["input_dequantized_from"] = already
    if calibration is not None:
        params["calibration_sha256"] = calibration.sha256
    if mixed_info:
        params["mixed"] = mixed_info
    pid = provenance_id(ckpt.sha256, "quantize", params)
    out = output or default_output(
        spec.path, spec.is_alias, spec.text, "quantize", pid, target.extension()
    )
    check = check_output(out, kind, f"-o {output}" if output is not None else None)
    if dry_run:
        emit_plan(out, params, use_json(as_json))
        return
    emit = partial(
        emit_artifact, out, target_to, "quantize", params, ckpt.sha256, use_json(as_json)
    )
    if claim_output([check], pid, force or resume, output is None, emit):
        return
    from cllm.core.quantize.api import state_dir
    from cllm.core.quantize.store import saved_provenance

    saved = saved_provenance(state_dir(out), pid) if resume else None
    prov = saved or make_provenance(
        "quantize", params, ckpt.sha256, ckpt.provenance, str(ckpt.path),
        calibration=calibration.to_provenance() if calibration is not None else None, seed=seed if calibration is not None else None,
    )  # fmt: skip
    label = method.upper() + (" then GPTQ" if method == "awq" and awq_then == "gptq" else "")
    log(
        f"quantizing {spec.text} with {label} on "
        + (
            grid.describe()
            if grid
            else "mixed GGUF types"
            if mixed
            else "llama.cpp " + str(target.gguf_type)
        ),
        level=0,
    )
    n_layers = int(ckpt.config.get("num_hidden_layers", 0))
    with progress("layers" if layered else "tensors", n_layers if layered else None) as advance:
        report = quantize(
            ckpt, cfg, target, out, prov, resume=resume,
            progress=(lambda _n: advance()) if not layered else None,
            on_layer=lambda i, n: _after_layer(i, n, advance),
            calibration=calibration,
        )  # fmt: skip
    if report.get("note"):
        warn(str(report["note"]))
    types = report.get("types")
    if types:
        log(
            "tensor types: "
            + ", ".join(f"{k} {v}" for k, v in sorted(types.items(), key=lambda kv: -kv[1]))
        )
        if (
            target.gguf_type
            and target.gguf_type not in types
            and target.gguf_type[:2] not in "".join(types)
        ):
            warn(
                f"llama.cpp used no {target.gguf_type} tensor (row lengths of {ckpt.config.get('hidden_size')} force fallbacks)"
            )
    emit_artifact(out, target_to, "quantize", params, ckpt.sha256, use_json(as_json))


def parse_size(text: str) -> int:
    """Bytes from '104857600', '100MB', '95.5M', '1G' (decimal units, as file sizes are shown)."""
    import re

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMgG]?)[bB]?\s*", text)
    if not m:
        raise UsageError(
            f"--target-size {text!r} is not a size", "Use bytes or a number with K, M or G"
        )
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def _sensitivity_chunks(ckpt: Checkpoint, calib: Path | None, chunks: int, seed: int) -> list:
    from cllm.core.quantize.calib import default_calibration_file, load_calibration

    cal = load_calibration(
        Path(calib) if calib else default_calibration_file(),
        ckpt.tokenizer_dir(),
        chunks,
        512,
        seed,
    )
    return [row.numpy() for row in cal.ids]


def _measure(
    ckpt: Checkpoint, cands: list[str], calib: Path | None, chunks: int, seed: int
) -> SensitivityReport:
    """Per-layer KLD on calibration text (never the evaluation text, which would leak)."""
    from cllm.core.quantize.sensitivity import measure_sensitivity

    data = _sensitivity_chunks(ckpt, calib, chunks, seed)
    n_layers = int(ckpt.config.get("num_hidden_layers", 0))
    with progress("sensitivity", n_layers * len(cands)) as advance:
        report = measure_sensitivity(ckpt, data, cands, on_step=lambda _i, _n: advance())
    report.protocol = {
        "text": str(calib or "default calibration"),
        "chunks": chunks,
        "ctx": 512,
        "seed": seed,
    }
    return report


def _load_or_measure(
    ckpt: Checkpoint,
    cands: list[str],
    calib: Path | None,
    chunks: int,
    seed: int,
    path: Path | None,
) -> tuple[SensitivityReport, str]:
    import hashlib
    import json

    from cllm.core.quantize.sensitivity import SensitivityReport

    if path is not None:
        try:
            raw = Path(path).read_text()
            report = SensitivityReport.from_dict(json.loads(raw))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"cannot read sensitivity file {path}: {exc}") from exc
        n_layers = int(ckpt.config.get("num_hidden_layers", 0))
        if report.layers != n_layers:
            raise UsageError(f"{path} measures {report.layers} layers, the model has {n_layers}")
    else:
        log(
            "measuring per-layer sensitivity (use --sensitivity once and --sensitivity-file to reuse it)"
        )
        report = _measure(ckpt, cands, calib, chunks, seed)
        raw = json.dumps(report.to_dict(), sort_keys=True)
    return report, hashlib.sha256(raw.encode()).hexdigest()


def _sensitivity_checks(out: Path, output: Path | None) -> list[OutputCheck]:
    """The JSON report and the heat map PNG written beside it: both must be free or cllm's
    own sensitivity outputs."""
    from cllm.formats.outputs import Kind, check_output

    png = out.with_suffix(".png")
    if png == out:
        raise UsageError(
            f"-o {out}: --sensitivity writes a JSON report there and its heat map beside it as .png",
            "Give the JSON's name, e.g. -o sens.json",
        )
    label = f"-o {output}" if output is not None else None
    png_label = f"{png} (the heat map beside -o {output})" if output is not None else None
    return [
        check_output(out, Kind.SENSITIVITY_JSON, label),
        check_output(png, Kind.HEATMAP_PNG, png_label),
    ]


def _write_sensitivity(
    ckpt: Checkpoint,
    spec: Spec,
    cands: list[str],
    calib: Path | None,
    chunks: int,
    seed: int,
    output: Path | None,
    force: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Per-layer KLD as JSON plus a heat map PNG; both carry provenance, so a re-run with the
    same input and parameters reuses them and a later run knows they are cllm's to replace."""
    import json

    from cllm.core.quantize.sensitivity import heatmap_png
    from cllm.formats.atomic import atomic_path
    from cllm.formats.outputs import Kind, mark_png
    from cllm.formats.provenance import make_provenance, provenance_id

    params = {
        "candidates": cands,
        "chunks": chunks,
        "calib": str(calib) if calib else None,
        "seed": seed,
    }
    pid = provenance_id(ckpt.sha256, "sensitivity", params)
    out = output or default_output(spec.path, spec.is_alias, spec.text, "sensitivity", pid, ".json")
    checks = _sensitivity_checks(out, output)
    png = checks[1].path
    if dry_run:
        for path in (out, png):
            emit_plan(path, params, use_json(as_json))
        return

    def emit() -> None:
        for path, fmt in ((out, "json"), (png, "png")):
            emit_artifact(path, fmt, "sensitivity", params, ckpt.sha256, use_json(as_json))

    if claim_output(checks, pid, force, output is None, emit):
        return
    prov = make_provenance("sensitivity", params, ckpt.sha256, ckpt.provenance, str(ckpt.path))
    report = _measure(ckpt, cands, calib, chunks, seed)
    data = {**report.to_dict(), "model_sha256": ckpt.sha256, "params": params, "provenance": prov}
    with atomic_path(out, Kind.SENSITIVITY_JSON) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    with atomic_path(png, Kind.HEATMAP_PNG) as tmp:
        heatmap_png(report, tmp)
        mark_png(tmp, prov)
    emit()


def _after_layer(i: int, n: int, advance: Callable[..., None]) -> None:
    advance(description=f"layer {i + 1}/{n}")
    # test hook: die like a killed process once layer i is saved (tests of --resume use it)
    if os.environ.get("CLLM_TEST_KILL_AFTER_LAYER") == str(i):
        os.kill(os.getpid(), signal.SIGKILL)
