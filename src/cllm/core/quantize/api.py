"""`cllm quantize` as a function: checkpoint + method config + target in, a file or folder out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from cllm.core.quantize.awq import AWQConfig, run_awq
from cllm.core.quantize.grid import GGUF_GRIDS, GGUFGrid, Grid, IntGrid
from cllm.core.quantize.methods import (
    GPTQConfig,
    MethodConfig,
    RTNConfig,
    check_divisible,
    loadable_group_size,
    select_tensors,
)
from cllm.errors import UsageError
from cllm.formats.checkpoint import Checkpoint

Progress = Callable[[str], None]

# every llama.cpp file type its quantizer knows, by the name users type
LLAMACPP_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S",
    "Q4_1", "Q4_0", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "Q2_K_S", "IQ4_NL", "IQ4_XS", "IQ3_M",
    "IQ3_S", "IQ3_XS", "IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S", "TQ1_0", "TQ2_0",
)  # fmt: skip
NEEDS_IMATRIX = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M", "Q2_K_S")


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
            if isinstance(method, RTNConfig):
                return None
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
) -> dict[str, Any]:
    """Run the method and write the output. Returns a report (types used, tensors quantized)."""
    grid = target.grid(method)
    names = select_tensors(ckpt, target.keep)
    if grid is None:  # RTN to a llama.cpp type
        from cllm.core.quantize import writers
        from cllm.formats.gguf_io import WRITABLE_TYPES

        gtype = str(target.gguf_type).upper()
        if gtype in WRITABLE_TYPES and gtype not in ("F32", "F16", "BF16"):
            # the same blocks llama.cpp writes, streamed by cllm: memory stays near one tensor
            report = writers.write_gguf_rtn(out, ckpt, names, gtype, provenance, progress)
        else:  # K-quants, IQ and float types: llama.cpp's own quantizer and recipes
            report = writers.write_gguf_llamacpp(out, ckpt, gtype, provenance, progress)
        report["quantized_tensors"] = len(names)
        return report
    check_divisible(ckpt, names, grid)
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
    layered = isinstance(method, (GPTQConfig, AWQConfig))
    if isinstance(method, (GPTQConfig, AWQConfig)):
        from cllm.core.quantize.store import LayerStateStore

        method.validate()
        if calibration is None:
            raise UsageError(f"{method.method.upper()} needs calibration data")
        store: Any = LayerStateStore(state_dir(out), provenance["id"], names)
        if isinstance(method, AWQConfig):
            run_awq(ckpt, grid, names, method, calibration, store, resume=resume, on_layer=on_layer)
        else:
            from cllm.core.quantize.gptq_layerwise import run_gptq

            run_gptq(
                ckpt, grid, names, method, calibration, store, resume=resume, on_layer=on_layer
            )
    else:
        from cllm.core.quantize.store import RTNStore

        store = RTNStore(ckpt, grid, names)
    from cllm.core.quantize import writers

    if isinstance(grid, GGUFGrid):
        report = writers.write_gguf_grid(out, ckpt, store, names, grid, provenance, progress)
    elif target.fake:
        report = writers.write_fake(out, ckpt, store, names, provenance, progress)
    else:
        report = writers.write_packed(out, ckpt, store, names, grid, provenance, progress)
    if layered:
        store.cleanup()
    report["quantized_tensors"] = len(names)
    report.update(notes)
    return report


def state_dir(out: Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.cllm-state"


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).sum() / b.pow(2).sum().clamp(min=1e-30))
