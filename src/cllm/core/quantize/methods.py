"""Quantization method configs and their registered handlers.

A method is a config dataclass (recorded in provenance, built by the CLI from
flags or by Python callers directly) plus a handler that, given the checkpoint,
the target grid and the tensors to quantize, yields per-tensor results.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from cllm.core.calib import CalibrationOptions
from cllm.core.quantize.awq import AWQConfig
from cllm.core.quantize.grid import GGUFGrid, Grid
from cllm.core.quantize.registry import QUANTIZERS, QuantContext
from cllm.errors import UsageError
from cllm.formats.checkpoint import Checkpoint

# Linear weights inside decoder layers: what every method quantizes by default
LINEAR_RE = re.compile(r"model\.layers\.\d+\..*_proj\.weight$")


@dataclass
class QuantResult:
    codes: torch.Tensor  # [rows, cols] integer-valued
    scales: torch.Tensor  # [rows, groups]
    zeros: torch.Tensor  # [rows, groups]
    group_size: int  # columns per scale (the last group may be shorter)
    raw: torch.Tensor | None = None  # K grids: the blocks as stored (uint8 [rows, row bytes])

    def dequantize(self) -> torch.Tensor:
        from cllm.core.quantize.grid import dequantize_groups

        return dequantize_groups(self.codes, self.scales, self.zeros, self.group_size)


@dataclass
class RTNConfig:
    """Round to nearest: no calibration, streams tensor by tensor."""

    clip: bool = False  # search each group's range for the lowest rounding error
    method: str = field(default="rtn", init=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        pass

    def needs_calibration(self) -> bool:
        return False


@QUANTIZERS.register("rtn", RTNConfig)
def rtn_store(
    ckpt: Checkpoint, grid: Any, names: list[str], cfg: RTNConfig, ctx: QuantContext
) -> Any:
    """Nothing to compute up front: the store rounds each tensor when the writer asks."""
    from cllm.core.quantize.store import RTNStore

    return RTNStore(ckpt, grid, names, clip=cfg.clip)


@dataclass
class GPTQConfig(CalibrationOptions):
    """GPTQ with a Hessian from calibration activations, layer by layer."""

    act_order: bool = True
    damp: float = 0.01
    blocksize: int = 128
    clip: bool = False  # search each group's range for the lowest rounding error
    method: str = field(default="gptq", init=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        self.check_calibration()
        check_calibrated_options(self.compute_dtype, self.damp)

    def needs_calibration(self) -> bool:
        return True


def check_calibrated_options(compute_dtype: str, damp: float) -> None:
    """Options GPTQ and AWQ share."""
    if compute_dtype not in ("auto", "fp32", "bf16"):
        raise UsageError(
            f"--calib-dtype {compute_dtype} is not supported", "Use auto, fp32 or bf16"
        )
    if not 0 < damp < 1:
        raise UsageError(f"--damp {damp} is out of range", "Use a value in (0, 1), e.g. 0.01")


MethodConfig = RTNConfig | GPTQConfig | AWQConfig
Progress = Callable[[str], None]


def keep_patterns(keep: list[str]) -> list[re.Pattern[str]]:
    """--keep regexes (quantize's and prune's), refused one by one when malformed."""
    pats = []
    for k in keep:
        try:
            pats.append(re.compile(k))
        except re.error as exc:
            raise UsageError(f"--keep {k!r} is not a valid regular expression ({exc})") from exc
    return pats


def select_tensors(ckpt: Checkpoint, keep: list[str]) -> list[str]:
    """Linear weights of decoder layers, minus those matching any --keep regex."""
    pats = keep_patterns(keep)
    names = [n for n, i in ckpt.tensor_infos().items() if LINEAR_RE.search(n) and len(i.shape) == 2]
    return [n for n in names if not any(p.search(n) for p in pats)]


def check_divisible(ckpt: Checkpoint, names: list[str], grid: Grid) -> None:
    """GGUF blocks must tile a row exactly; int groups may end in a shorter group."""
    if not isinstance(grid, GGUFGrid):
        return
    for n in names:
        cols = ckpt.tensor_infos()[n].shape[1]
        if cols % 32:
            raise UsageError(
                f"tensor {n} has rows of {cols}, not a multiple of the {grid.qtype} block of 32",
                "--keep that tensor or choose another type",
            )


def loadable_group_size(ckpt: Checkpoint, names: list[str], group: int) -> int:
    """compressed-tensors loaders need the group size to divide every row: the largest
    size <= `group` (down to 32) that does, or -1 (per channel) when none does."""
    if group == -1:
        return -1
    cols = {ckpt.tensor_infos()[n].shape[1] for n in names}
    g = group
    while g >= 32:
        if all(c % g == 0 for c in cols):
            return g
        g //= 2
    return -1
