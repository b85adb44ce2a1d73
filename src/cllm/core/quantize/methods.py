"""Quantization method configs and their registered handlers.

A method is a config dataclass (recorded in provenance, built by the CLI from
flags or by Python callers directly) plus a handler that, given the checkpoint,
the target grid and the tensors to quantize, yields per-tensor results.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from cllm.core.quantize.grid import Grid, quantize_rtn
from cllm.errors import UsageError
from cllm.formats.checkpoint import Checkpoint

# Linear weights inside decoder layers: what every method quantizes by default
LINEAR_RE = re.compile(r"model\.layers\.\d+\..*_proj\.weight$")


@dataclass
class QuantResult:
    codes: torch.Tensor  # [rows, cols] integer-valued
    scales: torch.Tensor  # [rows, groups]
    zeros: torch.Tensor  # [rows, groups]

    def dequantize(self) -> torch.Tensor:
        from cllm.core.quantize.grid import dequantize_groups

        return dequantize_groups(self.codes, self.scales, self.zeros)


@dataclass
class RTNConfig:
    """Round to nearest: no calibration, streams tensor by tensor."""

    method: str = field(default="rtn", init=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GPTQConfig:
    """GPTQ with a Hessian from calibration activations, layer by layer."""

    act_order: bool = False
    damp: float = 0.01
    blocksize: int = 128
    calib: str | None = None
    calib_samples: int = 128
    calib_seqlen: int = 512
    seed: int = 0
    batch_size: int = 8
    method: str = field(default="gptq", init=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        if not 0 < self.damp < 1:
            raise UsageError(
                f"--damp {self.damp} is out of range", "Use a value in (0, 1), e.g. 0.01"
            )


MethodConfig = RTNConfig | GPTQConfig
Progress = Callable[[str], None]


def select_tensors(ckpt: Checkpoint, keep: list[str]) -> list[str]:
    """Linear weights of decoder layers, minus those matching any --keep regex."""
    pats = []
    for k in keep:
        try:
            pats.append(re.compile(k))
        except re.error as exc:
            raise UsageError(f"--keep {k!r} is not a valid regular expression ({exc})") from exc
    names = [n for n, i in ckpt.tensor_infos().items() if LINEAR_RE.search(n) and len(i.shape) == 2]
    return [n for n in names if not any(p.search(n) for p in pats)]


def check_divisible(ckpt: Checkpoint, names: list[str], grid: Grid) -> None:
    for n in names:
        cols = ckpt.tensor_infos()[n].shape[1]
        g = grid.group_width(cols)
        if cols % g:
            raise UsageError(
                f"tensor {n} has rows of {cols}, not a multiple of group size {g}",
                "Pick a group size that divides it, or --keep that tensor",
            )


def run_rtn(
    ckpt: Checkpoint,
    grid: Grid,
    names: list[str],
    cfg: RTNConfig,
    progress: Progress | None = None,
    **_: Any,
) -> Iterator[tuple[str, QuantResult]]:
    for n in names:
        codes, scales, zeros = quantize_rtn(ckpt.get(n).float(), grid)
        if progress:
            progress(n)
        yield n, QuantResult(codes, scales, zeros)
