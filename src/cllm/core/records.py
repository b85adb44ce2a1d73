"""The NDJSON records `cllm eval` and `cllm bench` print, and what `cllm report` reads back.

A record names its schema so a reader can tell cllm's lines from anything else piped in.
The provenance summary is what a plot labels a point with and what a table groups by: the
chain of operations that made the model, flattened to the few fields a reader compares
(method, bits or GGUF type, sparsity or pattern, calibration size, seed). `setting` hashes
everything except seeds, so runs of one setting with different seeds group together.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from cllm.formats.provenance import chain

EVAL_SCHEMA = "cllm.eval/1"
BENCH_SCHEMA = "cllm.bench/1"
SCHEMAS = (EVAL_SCHEMA, BENCH_SCHEMA)

# steps that change the storage but not the model: not part of a label
_NEUTRAL_OPS = {"dequantize"}


def _method_name(params: dict[str, Any]) -> str | None:
    m = params.get("method")
    if isinstance(m, dict):
        name = m.get("method")
        then = m.get("then") or m.get("awq_then")
        if isinstance(then, dict):
            then = then.get("method")
        return f"{name}+{then}" if name and isinstance(then, str) else name
    return m if isinstance(m, str) else None


def _calib(prov: dict[str, Any]) -> tuple[int | None, int | None]:
    cal = prov.get("calibration")
    if isinstance(cal, dict):
        return cal.get("samples"), cal.get("seed")
    cfg = (prov.get("params") or {}).get("config")
    if isinstance(cfg, dict) and "calib_samples" in cfg:
        return cfg.get("calib_samples"), cfg.get("seed")
    return None, prov.get("seed")


def step_summary(prov: dict[str, Any]) -> dict[str, Any]:
    """One provenance step as the fields a comparison needs, plus a short label."""
    op = str(prov.get("op"))
    params = prov.get("params") or {}
    out: dict[str, Any] = {"op": op, "method": _method_name(params)}
    samples, seed = _calib(prov)
    if samples is not None:
        out["calib_samples"] = samples
    if seed is not None:
        out["seed"] = seed
    label = op
    if op == "quantize":
        target = params.get("target") or {}
        gtype, bits = target.get("gguf_type"), target.get("bits")
        out.update(gguf_type=gtype, bits=bits)
        mixed = params.get("mixed") or {}
        if mixed:
            out["mixed_bpw"] = mixed.get("target_bpw")
            size = mixed.get("target_size")
            grid = (
                f"mixed {mixed['target_bpw']} bpw" if mixed.get("target_bpw") else f"mixed {size} B"
            )
        elif gtype:
            grid = gtype
        else:
            grid = f"{bits}-bit g{target.get('group_size')}"
        label = f"{out['method'] or 'rtn'} {grid}"
    elif op == "prune":
        cfg = params.get("config") or {}
        method = out["method"] or "prune"
        if "drop_layers" in cfg:
            out["drop_layers"] = cfg["drop_layers"]
            label = f"drop {cfg['drop_layers']} layers"
        elif "ratio" in cfg:
            out.update(structured=cfg.get("target"), ratio=cfg["ratio"])
            label = f"structured {cfg.get('target')} {cfg['ratio']:.0%}"
        else:
            out.update(sparsity=cfg.get("sparsity"), pattern=cfg.get("pattern"))
            label = f"{method} {cfg.get('pattern') or format(cfg.get('sparsity') or 0, '.0%')}"
            if cfg.get("layers"):
                out["layers"] = cfg["layers"]
                label += f" layers {cfg['layers']}"
    elif op == "export":
        what = params.get("gguf_type") or params.get("quant") or ""
        out.update(to=params.get("to"), gguf_type=params.get("gguf_type"))
        label = f"export {params.get('to')} {what}".strip()
    if samples is not None:  # calibration size tells settings of one method apart
        label += f" n{samples}"
    out["label"] = label
    return {k: v for k, v in out.items() if v is not None}


def _strip_seeds(obj: Any) -> Any:
    if isinstance(obj, dict):
        drop = {"seed", "calibration_sha256", "sha256", "created", "command", "versions", "id"}
        return {k: _strip_seeds(v) for k, v in obj.items() if k not in drop}
    if isinstance(obj, list):
        return [_strip_seeds(v) for v in obj]
    return obj


def _calibration_setting(prov: dict[str, Any]) -> dict[str, Any] | None:
    cal = prov.get("calibration")
    if not isinstance(cal, dict):
        return None
    return {k: cal.get(k) for k in ("samples", "seqlen", "path")}


def provenance_summary(prov: dict[str, Any] | None) -> dict[str, Any]:
    """The whole chain, oldest step first, flattened: the newest step's method and grid, the
    sparsity of any pruning step, and a label such as "sparsegpt 2:4 → gptq Q4_0"."""
    steps = [p for p in reversed(chain(prov)) if p.get("op") not in _NEUTRAL_OPS]
    summaries = [step_summary(p) for p in steps]
    out: dict[str, Any] = {"steps": summaries}
    for s in summaries:  # later steps override earlier ones field by field
        for key in ("method", "bits", "gguf_type", "sparsity", "pattern", "structured",
                    "ratio", "drop_layers", "mixed_bpw", "calib_samples", "seed", "layers"):  # fmt: skip
            if key in s:
                out[key] = s[key]
    out["label"] = " → ".join(s["label"] for s in summaries) or "base"
    parent = (prov or {}).get("parent") or {}
    out["parent"] = parent.get("sha256")
    out["parent_path"] = parent.get("path")
    out["id"] = (prov or {}).get("id")
    blob = json.dumps(
        [[_strip_seeds(p.get("params")), _calibration_setting(p)] for p in steps],
        sort_keys=True,
        default=str,
    )
    out["setting"] = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return out


def is_record(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("schema") in SCHEMAS
