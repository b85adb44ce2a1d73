"""`cllm quantize` as a function: checkpoint + method config + target in, a file or folder out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import cllm.core.quantize.gptq_layerwise  # noqa: F401 - registers GPTQ
from cllm.core.job import state_dir
from cllm.core.quantize.grid import GGUF_GRIDS, GGUFGrid, Grid, IntGrid
from cllm.core.quantize.kplan import is_k_mix, k_mix_plan
from cllm.core.quantize.methods import (
    GPTQConfig,
    MethodConfig,
    RTNConfig,
    check_divisible,
    loadable_group_size,
    select_tensors,
)
from cllm.core.quantize.registry import QUANTIZERS, QuantContext
from cllm.errors import UsageError
from cllm.formats.checkpoint import Checkpoint

Progress = Callable[[str], None]

# every llama.cpp file type its quantizer knows, by the name users type
LLAMACPP_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S",
    "Q4_1", "Q4_0", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "Q2_K_S", "IQ4_NL", "IQ4_XS", "IQ3_M",
    "IQ3_S", "IQ3_XS", "IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S", "TQ1_0", "TQ2_0",
)  # fmt: skip
# llama.cpp refuses these without an importance matrix (checked on llama-cpp-python 0.3.36)
NEEDS_IMATRIX = (
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "Q2_K_S",
)  # fmt: skip
IQ_TYPES = (
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S",
    "IQ3_M", "IQ4_NL", "IQ4_XS",
)  # fmt: skip


@dataclass
class Target:
    """Where the quantized model goes and in what form."""

    to: str = "safetensors"  # safetensors | gguf
    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    gguf_type: str | None = None
    fake: bool = False  # dense dequantized weights instead of packed integers
    keep: list[str] = field(default_factory=list)
    # mixed precision: one llama.cpp block type per decoder layer, chosen from measured sensitivity
    layer_types: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def grid(self, method: MethodConfig) -> Grid | None:
        """The grid the method optimises on; None when llama.cpp's own quantizer does the work."""
        if self.to == "gguf":
            t = (self.gguf_type or "").upper()
            if t not in LLAMACPP_TYPES:
                raise UsageError(
                    f"unknown GGUF type {self.gguf_type}",
                    "Choose one of " + ", ".join(LLAMACPP_TYPES),
                )
            if isinstance(method, RTNConfig) and not method.clip:
                return None
            if t not in GGUF_GRIDS and isinstance(method, RTNConfig):
                raise UsageError(
                    f"--clip cannot target {t}",
                    "llama.cpp's quantizer searches K-quant and IQ scales itself; drop --clip",
                )
            if is_k_mix(t) and isinstance(method, GPTQConfig):
                return None  # quantize() plans each tensor's grid from llama.cpp's mix
            if t not in GGUF_GRIDS:
                raise UsageError(
                    f"{method.method.upper()} cannot target {t} yet",
                    "Use one of "
                    + ", ".join(GGUF_GRIDS)
                    + ", or --method rtn for llama.cpp's own "
                    + t,
                )
            return GGUFGrid(t)
        return IntGrid(self.bits, self.group_size, self.symmetric)

    def extension(self) -> str:
        return ".gguf" if self.to == "gguf" else ""


def quantize(
    ckpt: Checkpoint,
    method: MethodConfig,
    target: Target,
    out: Path,
    provenance: dict[str, Any],
    *,
    resume: bool = False,
    progress: Progress | None = None,
    on_layer: Callable[[int, int], None] | None = None,
    calibration: Any = None,
    imatrix: Any = None,
) -> dict[str, Any]:
    """Run the method and write the output. Returns a report (types used, tensors quantized).

    `imatrix` (a `cllm.formats.imatrix.Imatrix`) goes to llama.cpp's quantizer, which then
    writes every GGUF type, legacy ones included (it weights their scale search too)."""
    names = select_tensors(ckpt, target.keep)
    other_types: dict[str, str] | None = None
    if target.layer_types is not None:
        plan, types = _mixed_plan(ckpt, target, names)
        grid: Any = plan
    elif target.to == "gguf" and is_k_mix(target.gguf_type) and isinstance(method, GPTQConfig):
        kplan = k_mix_plan(ckpt, str(target.gguf_type), names)
        grid, names, other_types = kplan.grids, kplan.names, kplan.other_types
    else:
        grid = target.grid(method)
    if grid is None or (target.layer_types is not None and _plain_rtn(method)):
        # llama.cpp's block layouts, streamed by cllm or made by llama.cpp itself
        report = _write_rtn_gguf(ckpt, target, names, out, provenance, progress, imatrix)
        report["quantized_tensors"] = len(names)
        return report
    if not isinstance(grid, dict):
        check_divisible(ckpt, names, grid)
    elif other_types is None:
        check_divisible(ckpt, names, grid[0])
    notes: dict[str, Any] = {}
    if isinstance(grid, IntGrid) and not target.fake:
        usable = loadable_group_size(ckpt, names, grid.group_size)
        if usable != grid.group_size:
            notes["group_size_used"] = usable
            notes["note"] = (
                f"group size {grid.group_size} does not divide every row, which compressed-tensors loaders require; "
                f"used {'per-channel' if usable == -1 else usable} (--fake keeps {grid.group_size} with a shorter last group)"
            )
            grid = IntGrid(grid.bits, usable, grid.symmetric)
    method.validate()
    if method.needs_calibration() and calibration is None:
        raise UsageError(f"{method.method.upper()} needs calibration data")
    ctx = QuantContext(calibration, state_dir(out), provenance["id"], provenance, resume, on_layer)
    store = QUANTIZERS.handler_for(method)(ckpt, grid, names, method, ctx)
    from cllm.core.quantize import writers

    if isinstance(grid, (dict, GGUFGrid)):
        report = writers.write_gguf_grid(
            out, ckpt, store, names, grid, provenance, progress, other_types
        )
    elif target.fake:
        report = writers.write_fake(out, ckpt, store, names, provenance, progress)
    else:
        report = writers.write_packed(out, ckpt, store, names, grid, provenance, progress)
    if hasattr(store, "cleanup"):
        store.cleanup()
    report["quantized_tensors"] = len(names)
    if target.layer_types is not None:
        report["layer_types"] = types
    report.update(notes)
    return report


def _plain_rtn(method: MethodConfig) -> bool:
    return isinstance(method, RTNConfig) and not method.clip


def _write_rtn_gguf(
    ckpt: Checkpoint,
    target: Target,
    names: list[str],
    out: Path,
    provenance: dict[str, Any],
    progress: Progress | None,
    imatrix: Any = None,
) -> dict[str, Any]:
    from cllm.core.quantize import writers
    from cllm.core.quantize.grid import layer_of
    from cllm.formats.gguf_io import WRITABLE_TYPES

    if target.layer_types is not None:
        per_name = {n: target.layer_types[layer_of(n)] for n in names}
        report = writers.write_gguf_rtn(out, ckpt, names, per_name, provenance, progress)
        report["layer_types"] = list(target.layer_types)
        return report
    gtype = str(target.gguf_type).upper()
    if imatrix is None and gtype in WRITABLE_TYPES and gtype not in ("F32", "F16", "BF16"):
        # the same blocks llama.cpp writes, streamed by cllm: memory stays near one tensor
        return writers.write_gguf_rtn(out, ckpt, names, gtype, provenance, progress)
    # K-quants, IQ and float types: llama.cpp's own quantizer and recipes
    return writers.write_gguf_llamacpp(out, ckpt, gtype, provenance, progress, imatrix)


def _mixed_plan(
    ckpt: Checkpoint, target: Target, names: list[str]
) -> tuple[dict[int, GGUFGrid], list[str]]:
    """A GGUF whose decoder layers use different block types (from `plan_layer_types`)."""
    if target.to != "gguf":
        raise UsageError("mixed precision writes GGUF", "Add --to gguf")
    types = list(target.layer_types or [])
    n_layers = int(ckpt.config.get("num_hidden_layers", 0))
    if len(types) != n_layers:
        raise UsageError(f"{len(types)} layer types given for {n_layers} layers")
    return {i: GGUFGrid(t) for i, t in enumerate(types)}, types


def fixed_gguf_bytes(ckpt: Checkpoint, names: list[str]) -> int:
    """Bytes of what mixed precision does not choose: embeddings (Q8_0), norms (F32), kept
    tensors (F16), plus an upper bound on metadata (the tokenizer's JSON size)."""
    selected = set(names)
    total = 0
    for n, info in ckpt.tensor_infos().items():
        if n in selected:
            continue
        if len(info.shape) < 2:
            total += 4 * info.numel
        elif n in ("model.embed_tokens.weight", "lm_head.weight") and not (
            n == "lm_head.weight" and ckpt.config.get("tie_word_embeddings")
        ):
            total += info.numel * 34 // 32
        elif n != "lm_head.weight":
            total += 2 * info.numel
    return total + gguf_metadata_bytes(ckpt)


def gguf_metadata_bytes(ckpt: Checkpoint) -> int:
    """An upper bound on a GGUF's non-tensor bytes: tokenizer arrays, keys, tensor infos, padding."""
    import json

    n_tensors = len(ckpt.tensor_infos())
    total = 16 << 10  # header, hyperparameters, provenance
    total += n_tensors * (96 + 32)  # tensor info + alignment padding
    tok = ckpt.tokenizer_dir() / "tokenizer.json"
    if not tok.exists():
        return total + (4 << 20)
    spec = json.loads(tok.read_text(encoding="utf-8"))
    model = spec.get("model", {})
    tokens = list(model.get("vocab", {})) + [
        t.get("content", "") for t in spec.get("added_tokens", [])
    ]
    n_vocab = max(len(tokens), int(ckpt.config.get("vocab_size", 0)))
    total += sum(len(t.encode()) + 8 + 4 for t in tokens) + (n_vocab - len(tokens)) * 24
    merges = model.get("merges", [])
    total += sum(len((m if isinstance(m, str) else " ".join(m)).encode()) + 8 for m in merges)
    template = ckpt.tokenizer_dir() / "chat_template.jinja"
    if template.exists():
        total += template.stat().st_size
    return total


def plan_layer_types(
    report: Any,
    ckpt: Checkpoint,
    names: list[str],
    target_bpw: float | None,
    target_size: int | None,
) -> tuple[list[str], dict[str, Any]]:
    """Per-layer types minimising measured sensitivity under a bits-per-weight or file-size budget."""
    from cllm.core.quantize.sensitivity import TYPE_BPW, allocate

    params = sum(report.layer_params)
    if target_bpw is not None:
        budget = target_bpw * params
    elif target_size is not None:
        budget = (target_size - fixed_gguf_bytes(ckpt, names)) * 8
        if budget <= 0:
            raise UsageError(
                f"--target-size {target_size} is smaller than the embeddings and metadata alone"
            )
    else:
        raise UsageError("give --target-bpw or --target-size")
    types = allocate(report, budget)
    achieved = (
        sum(p * TYPE_BPW[t] for p, t in zip(report.layer_params, types, strict=True)) / params
    )
    return types, {"budget_bits": budget, "bits_per_weight": achieved}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).sum() / b.pow(2).sum().clamp(min=1e-30))
