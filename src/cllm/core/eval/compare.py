"""`cllm eval BASE CAND...`: many candidates against one base, one NDJSON record each.

The base's log-probabilities are computed once and cached (on disk, or in a temporary
folder with --no-cache), so N candidates cost N model passes plus one base pass. Every
candidate is opened and checked against the base (vocabulary, tokenization of the text)
before any scoring starts: a run of ten candidates does not fail at the ninth.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cllm.core.eval.perplexity import EvalConfig, EvalResult
from cllm.core.records import EVAL_SCHEMA, provenance_summary
from cllm.errors import InputError, UsageError


@dataclass
class Candidate:
    """One model to evaluate: what the user named, what it is, and the backend it runs on."""

    name: str
    model: Any  # Checkpoint | OnnxCheckpoint
    backend: str
    provenance: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)


def pick_backend(kind_is_onnx: bool, fmt: str, backend: str) -> str:
    """`auto` runs each file on its own runtime; an ONNX export can only go to onnxruntime."""
    if kind_is_onnx:
        return "onnxruntime" if backend in ("torch", "auto") else backend
    if backend == "auto":
        return "llama.cpp" if fmt == "gguf" else "torch"
    return backend


def open_candidate(arg: str, backend: str) -> Candidate:
    from cllm.formats.inputs import CHECKPOINT, ONNX, resolve_input

    src = resolve_input(arg, accept=(CHECKPOINT, ONNX))
    is_onnx = src.kind == ONNX
    model: Any = src.onnx if is_onnx else src.checkpoint
    fmt = "onnx" if is_onnx else model.format
    return Candidate(src.text, model, pick_backend(is_onnx, fmt, backend), src.provenance)


def describe(c: Candidate) -> dict[str, Any]:
    """Size and identity of a candidate, read from headers only (no weights)."""
    from cllm.formats.hashing import artifact_files

    model = c.model
    if getattr(model, "format", None) == "onnx":
        size = sum(f.stat().st_size for f in artifact_files(model.path))
        params, bpw, fmt = None, None, "onnx"
    else:
        size = model.file_size
        infos = model.tensor_infos().values()
        params = sum(i.numel for i in infos)
        tensor_bytes = sum(i.nbytes for i in infos)
        bpw = tensor_bytes * 8 / params if params else None
        fmt = model.format
    record = {
        "schema": EVAL_SCHEMA,
        "name": c.name,
        "path": str(Path(model.path).resolve()),
        "format": fmt,
        "bytes": size,
        "params": params,
        "bits_per_weight": bpw,
        "sha256": model.sha256,
        "backend": c.backend,
        "provenance": provenance_summary(c.provenance),
    }
    sens = sensitivity_in(c.provenance)
    if sens is not None:
        record["sensitivity"] = sens
    return record


def sensitivity_in(prov: dict[str, Any] | None) -> dict[str, Any] | None:
    """The per-layer sensitivity map a mixed-precision step was planned from, if any."""
    from cllm.formats.provenance import chain

    for step in chain(prov):
        sens = ((step.get("params") or {}).get("mixed") or {}).get("sensitivity_map")
        if isinstance(sens, dict) and isinstance(sens.get("kld"), list):
            return sens
    return None


def vocab_size(model: Any) -> int | None:
    """From the config where there is one; an ONNX export is checked at its first chunk."""
    cfg = getattr(model, "config", None)
    if isinstance(cfg, dict) and isinstance(cfg.get("vocab_size"), int):
        return int(cfg["vocab_size"])
    return None


def check_against_base(cands: list[Candidate], base: Candidate, text: Path) -> None:
    """Refuse, before any work, a candidate the base cannot be compared with."""
    from cllm.core.eval.data import load_tokens

    base_vocab = vocab_size(base.model)
    base_ids = None
    for c in cands:
        v = vocab_size(c.model)
        if base_vocab is not None and v is not None and v != base_vocab:
            raise InputError(
                f"{c.name} has a vocabulary of {v} tokens and the base {base.name} {base_vocab}",
                "KL divergence compares the same vocabulary; evaluate it against a base of its family",
            )
        if c.model.sha256 == base.model.sha256:
            continue
        if base_ids is None:
            base_ids = load_tokens(text, base.model.tokenizer_dir()).ids
        ids = load_tokens(text, c.model.tokenizer_dir()).ids
        if len(ids) != len(base_ids) or not np.array_equal(ids, base_ids):
            raise InputError(
                f"{c.name} tokenizes the text differently from the base {base.name}",
                "KL divergence needs the same tokenizer on both sides",
            )


@dataclass
class CompareRequest:
    candidates: list[str]
    cfg: EvalConfig
    backend: str = "torch"
    kld_base: str | None = None  # None with several candidates: the first one is the base
    base_backend: str = "torch"
    use_cache: bool = True
    allow_nonfinite: bool = False
    show_worst: int = 0
    tasks: Any = None  # a TaskConfig (with its task list) to add task scores to each record
    task_bars: list[tuple[str | None, str, float]] = field(default_factory=list)


def plan(req: CompareRequest) -> tuple[list[Candidate], Candidate | None]:
    """Open every candidate and the base, and refuse what cannot be compared, before work."""
    if req.candidates.count("-") > 1:
        raise UsageError("only one model can come from stdin")
    cands = [open_candidate(a, req.backend) for a in req.candidates]
    base: Candidate | None = None
    if req.kld_base is not None:
        base = open_candidate(req.kld_base, req.base_backend)
    elif len(cands) > 1:
        base = replace(cands[0], backend=req.base_backend)
    if base is not None:
        if getattr(base.model, "format", None) == "onnx":
            raise UsageError(
                f"the base {base.name} is an ONNX export",
                "Give the base as safetensors or GGUF; ONNX exports can be candidates",
            )
        check_against_base(cands, base, Path(req.cfg.text))
    if req.show_worst and base is None:
        raise UsageError("--show-worst needs a base to compare with", "Add --kld-base BASE")
    return cands, base


def compare(
    req: CompareRequest,
    on_stage: Callable[[str], None] | None = None,
    on_chunk: Callable[[int, float], None] | None = None,
    on_tasks: Callable[[int], None] | None = None,
) -> Iterator[tuple[dict[str, Any], list[str]]]:
    """Yields each candidate's record as soon as it is done, with the bars it misses."""
    from cllm.core.eval.run import run_eval

    cands, base = plan(req)
    stage = on_stage or (lambda _m: None)
    with tempfile.TemporaryDirectory(prefix="cllm-base-") as tmp:
        cache_root = None if req.use_cache else Path(tmp)
        for i, c in enumerate(cands, 1):
            stage(f"[{i}/{len(cands)}] {c.name} ({c.backend})")
            record = describe(c)
            is_base = (
                base is not None
                and c.model.sha256 == base.model.sha256
                and c.backend == base.backend
            )
            result: EvalResult | None = None
            if req.tasks is None or base is not None or len(cands) > 1:
                result = run_eval(
                    c.model, replace(req.cfg, backend=c.backend),
                    kld_base=base.model if base is not None else None,
                    base_backend=base.backend if base is not None else None,
                    use_cache=req.use_cache, allow_nonfinite=req.allow_nonfinite,
                    on_stage=stage, on_chunk=on_chunk, cache_root=cache_root,
                    is_base=is_base, show_worst=req.show_worst,
                )  # fmt: skip
                record.update(result.to_dict())
                if base is not None and record.get("kld"):
                    record["kld"]["base"] = base.name  # as named (an alias, not its cache path)
            missed: list[str] = []
            if req.tasks is not None:
                from cllm.core.tasks.run import check_bars, run_tasks

                tres = run_tasks(c.model, replace(req.tasks, backend=c.backend), on_tasks)
                record["tasks"] = tres.tasks
                record["tasks_protocol"] = tres.protocol
                missed = [f"{c.name}: {m}" for m in check_bars(tres, req.task_bars)]
                if result is None:
                    record.update(model=str(c.model.path), model_sha256=c.model.sha256)
            yield record, missed
