"""`cllm info`: what a checkpoint is, how it is stored, and what made it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from cllm.cli._console import out_console, progress, use_json
from cllm.cli._emit import emit_json
from cllm.cli._errors import handle_errors
from cllm.cli._options import JSON_OPTION

if TYPE_CHECKING:
    from cllm.core.info import InfoReport


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    """Nested parameters as dotted keys, leaving out unset ones, for a compact table cell."""
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif v not in (None, [], {}, ""):
            out[f"{prefix}{k}"] = v
    return out


def info(
    checkpoint: str = typer.Argument(
        ..., help="Model path (.safetensors, .gguf, HF folder), alias, or '-' for stdin."
    ),
    sparsity: bool = typer.Option(
        True, "--sparsity/--no-sparsity", help="Count exact zeros (reads every tensor)."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Show architecture, size, storage types, bits per weight, sparsity and provenance.

    Example:

        cllm info smollm2-135m

        echo model.gguf | cllm info - --json
    """
    _info(checkpoint, sparsity, as_json)


@handle_errors("info")
def _info(checkpoint: str, sparsity: bool, as_json: bool) -> None:
    from cllm.core.info import inspect_checkpoint, inspect_folder_artifact
    from cllm.formats.inputs import BUNDLE, CHECKPOINT, ONNX, require_checkpoint, resolve_input

    src = resolve_input(checkpoint, accept=(CHECKPOINT, ONNX, BUNDLE))
    if src.kind != CHECKPOINT:
        folder = inspect_folder_artifact(src.path)
        if folder is None:  # resolve_input recognised it, so it changed since
            from cllm.errors import InputError

            raise InputError(f"{src.path} is no longer an ONNX export or bundle")
        _print_folder(folder, use_json(as_json))
        return
    ckpt = require_checkpoint(src)
    n = len(ckpt.tensor_infos())
    with progress("reading tensors", n if sparsity else 0) as advance:
        report = inspect_checkpoint(ckpt, sparsity=sparsity, on_tensor=lambda _n: advance())
    if use_json(as_json):
        emit_json(report.to_dict())
        return
    from rich.table import Table

    con = out_console()
    head = Table(show_header=False, box=None, pad_edge=False)
    head.add_column(style="bold")
    head.add_column()
    rows = [
        ("path", report.path),
        ("format", report.format),
        ("architecture", _architecture(report)),
        *(("", f) for f in report.features),
        ("layers", str(report.layers)),
        ("hidden size", str(report.hidden_size)),
        ("heads (kv)", f"{report.heads} ({report.kv_heads})"),
        ("vocab", str(report.vocab_size)),
        ("context", str(report.context_length)),
        ("parameters", f"{report.params:,}"),
        ("file size", f"{_human_bytes(report.file_bytes)} ({report.file_bytes:,} B)"),
        ("bits/weight", f"{report.bits_per_weight:.3f}"),
        (
            "sparsity",
            "not measured"
            if report.sparsity is None
            else f"{report.sparsity * 100:.2f}% exact zeros",
        ),
        *_sparsity_rows(report),
        ("sha256", str(report.sha256)),
    ]
    for k, v in rows:
        head.add_row(k, v)
    con.print(head)
    types = Table(title="storage types", title_justify="left")
    for col in ("type", "tensors", "parameters", "bytes", "bits/weight"):
        types.add_column(col, justify="right" if col != "type" else "left")
    for name, st in report.types.items():
        bpw = st.bytes * 8 / st.params if st.params else 0
        types.add_row(name, str(st.tensors), f"{st.params:,}", _human_bytes(st.bytes), f"{bpw:.2f}")
    con.print(types)
    if report.provenance:
        prov = Table(title="provenance (newest first)", title_justify="left")
        for col in ("#", "op", "params", "parent sha256", "created", "cllm"):
            prov.add_column(col)
        for i, p in enumerate(report.provenance):
            params = ", ".join(f"{k}={v}" for k, v in _flatten(p.get("params") or {}).items())
            parent = (p.get("parent_sha256") or "")[:12]
            ver = (p.get("versions") or {}).get("cllm", "")
            prov.add_row(str(i), str(p.get("op")), params, parent, str(p.get("created")), str(ver))
        con.print(prov)
        for i, p in enumerate(report.provenance):
            if p.get("result"):
                con.print(f"{i}  {p.get('op')} result: {_result_line(p['result'])}")
    else:
        con.print("provenance: none recorded (not made by cllm)")


def _result_line(result: dict) -> str:
    """A training run's outcome in one line: final losses, held-out KLD first -> last."""
    parts = [f"{result.get('steps')} steps"]
    final = result.get("final") or {}
    if "loss" in final:
        parts.append(f"final loss {final['loss']:.4f}")
    evals = result.get("evals") or []
    if evals:
        first, last = evals[0], evals[-1]
        parts.append(
            f"held-out KLD {first['kld']:.4f} (step {first['step']}) -> {last['kld']:.4f} (step {last['step']})"
        )
    if result.get("tokens_per_s"):
        parts.append(
            f"{result['tokens_per_s']:,.0f} tokens/s on {result.get('processes', 1)} process(es)"
        )
    return ", ".join(parts)


def _architecture(report: InfoReport) -> str:
    if report.family is None:
        return f"{report.architecture} (not supported by cllm's commands)"
    return f"{report.architecture} ({report.family})"


def _sparsity_rows(report: InfoReport) -> list[tuple[str, str]]:
    """Linear-weight sparsity, its N:M pattern and the per-layer spread, in two rows: the
    spread is what shows a non-uniform (OWL, --layers) prune at a glance; -v lists every layer."""
    from statistics import median

    from cllm.cli._console import STATE

    linear, layers, pattern = report.linear_sparsity, report.sparsity_layers, report.nm_pattern
    if linear is None:
        return []
    shape = f"{pattern} pattern" if pattern else "no N:M pattern"
    rows = [("linear sparsity", f"{linear * 100:.2f}% ({shape})")]
    if layers:
        pct = [v * 100 for v in layers]
        if STATE.verbose:
            spread = " ".join(f"{v:.1f}%" for v in pct)
        elif max(pct) - min(pct) < 0.005:
            spread = f"{pct[0]:.2f}% in each of {len(pct)} layers"
        else:
            spread = (  # fits an 80-column table
                f"min {min(pct):.2f} / median {median(pct):.2f} / max {max(pct):.2f}% "
                f"(-v lists all {len(pct)})"
            )
        rows.append(("per layer", spread))
    return rows


def _print_folder(report: dict, as_json: bool) -> None:
    """`cllm info` of an ONNX export or a bundle: what it holds and what made it."""
    if as_json:
        emit_json(report)
        return
    from rich.table import Table

    con = out_console()
    head = Table(show_header=False, box=None, pad_edge=False)
    head.add_column(style="bold")
    head.add_column()
    for key in ("path", "format", "target", "runtime", "file_bytes", "sha256"):
        if report.get(key) is not None:
            value = report[key]
            head.add_row(
                key.replace("_", " "), _human_bytes(value) if key == "file_bytes" else str(value)
            )
    for key in ("operators", "weight_types"):
        if report.get(key):
            head.add_row(
                key.replace("_", " "), ", ".join(f"{k} {v}" for k, v in report[key].items())
            )
    con.print(head)
    prov = report.get("provenance") or []
    if not prov:
        con.print("provenance: none recorded (not made by cllm)")
    for i, p in enumerate(prov):
        params = ", ".join(f"{k}={v}" for k, v in _flatten(p.get("params") or {}).items())
        con.print(f"{i}  {p.get('op')}  {params}  parent {(p.get('parent_sha256') or '')[:12]}")
