"""Quantization grids: how a group of weights maps to integer codes and back.

Every method (RTN, GPTQ, AWQ) works against a `Grid`, so the same algorithm can
target a plain b-bit integer grid (for packed safetensors) or the exact grid of a
llama.cpp type (block of 32, fp16 scale and min) so that the GGUF it writes is a
standard file llama.cpp runs at full speed.

Codes are unsigned (0 .. 2^bits-1); a weight is `scale * (code - zero)`. `zero` is
an integer for int grids and may be fractional for GGUF "_1" types (their min).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cllm.errors import UsageError


@dataclass
class GroupParams:
    scale: torch.Tensor  # [rows, 1] float32 ([rows, group] for K grids: one per column)
    zero: torch.Tensor  # [rows, 1] float32 (code units; K grids: the min, in weight units)
    extra: object = None  # K grids: the block parameters (cllm.formats.kquants.KFit)

    def at(self, col: int) -> GroupParams:
        """The parameters of one column of the group."""
        if self.scale.shape[1] == 1:
            return self
        return GroupParams(self.scale[:, col : col + 1], self.zero[:, col : col + 1], self.extra)


@dataclass(frozen=True)
class IntGrid:
    """b-bit integer codes, one scale (and zero point if asymmetric) per group of columns."""

    bits: int = 4
    group_size: int = 128  # -1: one group per row (per-channel)
    symmetric: bool = True

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise UsageError(f"--bits {self.bits} is out of range", "Use 2 to 8 bits")
        if self.group_size != -1 and self.group_size not in (32, 64, 128, 256):
            raise UsageError(
                f"--group-size {self.group_size} is not supported",
                "Use 32, 64, 128, 256 or -1 (per channel)",
            )

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def group_width(self, cols: int) -> int:
        return cols if self.group_size == -1 else self.group_size

    def fit(self, w: torch.Tensor) -> GroupParams:
        """Scale and zero for each row of a group `w` [rows, group]."""
        maxq = self.maxq
        xmin = w.min(dim=1, keepdim=True).values.clamp(max=0)
        xmax = w.max(dim=1, keepdim=True).values.clamp(min=0)
        if self.symmetric:
            amax = torch.maximum(xmin.abs(), xmax)
            scale = 2 * amax / maxq
            scale = torch.where(scale == 0, torch.ones_like(scale), scale)
            zero = torch.full_like(scale, (maxq + 1) / 2)
        else:
            scale = (xmax - xmin) / maxq
            scale = torch.where(scale == 0, torch.ones_like(scale), scale)
            zero = torch.round(-xmin / scale)
        return GroupParams(scale.float(), zero.float())

    def quantize(self, w: torch.Tensor, p: GroupParams) -> torch.Tensor:
        return torch.clamp(torch.round(w / p.scale) + p.zero, 0, self.maxq)

    def dequantize(self, q: torch.Tensor, p: GroupParams) -> torch.Tensor:
        return p.scale * (q - p.zero)

    def describe(self) -> str:
        g = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"int{self.bits} {g} {'sym' if self.symmetric else 'asym'}"


# llama.cpp legacy types: (bits, has_min)
GGUF_GRIDS = {
    "Q4_0": (4, False),
    "Q4_1": (4, True),
    "Q5_0": (5, False),
    "Q5_1": (5, True),
    "Q8_0": (8, False),
}


@dataclass(frozen=True)
class GGUFGrid:
    """The exact grid of a llama.cpp block type (32 weights per block, fp16 scale/min).

    Scales follow llama.cpp's reference quantizer (`d = max / -8` for Q4_0, `(max-min)/15`
    for Q4_1, ...), rounded to fp16 as stored; codes are the nearest point of that grid.
    """

    qtype: str = "Q4_0"

    def __post_init__(self) -> None:
        if self.qtype not in GGUF_GRIDS:
            raise UsageError(
                f"GGUF type {self.qtype} has no grid cllm can optimise on",
                "Use Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0 (other types go through llama.cpp's quantizer)",
            )

    @property
    def group_size(self) -> int:
        return 32

    @property
    def bits(self) -> int:
        return GGUF_GRIDS[self.qtype][0]

    @property
    def maxq(self) -> int:
        return 254 if self.qtype == "Q8_0" else (1 << self.bits) - 1

    def group_width(self, cols: int) -> int:
        return 32

    def fit(self, w: torch.Tensor) -> GroupParams:
        bits, has_min = GGUF_GRIDS[self.qtype]
        if self.qtype == "Q8_0":
            amax = w.abs().max(dim=1, keepdim=True).values
            d = (amax / 127).half().float()
            zero = torch.full_like(d, 127.0)
        elif has_min:
            lo = w.min(dim=1, keepdim=True).values
            hi = w.max(dim=1, keepdim=True).values
            d = ((hi - lo) / ((1 << bits) - 1)).half().float()
            m = lo.half().float()
            safe = torch.where(d == 0, torch.ones_like(d), d)
            zero = -m / safe
        else:
            idx = w.abs().argmax(dim=1, keepdim=True)
            signed_max = torch.gather(w, 1, idx)
            half = 1 << (bits - 1)
            d = (signed_max / -half).half().float()
            zero = torch.full_like(d, float(half))
        d = torch.where(d == 0, torch.ones_like(d), d) if has_min else d
        return GroupParams(d, zero)

    def quantize(self, w: torch.Tensor, p: GroupParams) -> torch.Tensor:
        safe = torch.where(p.scale == 0, torch.ones_like(p.scale), p.scale)
        return torch.clamp(torch.round(w / safe + p.zero), 0, self.maxq)

    def dequantize(self, q: torch.Tensor, p: GroupParams) -> torch.Tensor:
        if GGUF_GRIDS[self.qtype][1]:  # _1 types: llama.cpp computes d*q + m with m stored as fp16
            m = (-p.zero * p.scale).half().float()
            return p.scale * q + m
        return p.scale * (q - p.zero)

    def describe(self) -> str:
        return f"GGUF {self.qtype} grid"


@dataclass(frozen=True)
class KGrid:
    """The grid of a llama.cpp K type (Q2_K ... Q6_K): super-blocks of 256 columns whose
    sub-blocks (16 or 32 columns) have their own scale (and min), stored as small integers
    times an fp16 super-block scale. `fit` runs llama.cpp's reference search on the weights
    it is given (for GPTQ: as updated by the error feedback so far), so every block written
    is one llama.cpp's own quantizer could have produced; codes then round on each column's
    sub-block step, as the reference's final pass does."""

    qtype: str = "Q4_K"

    def __post_init__(self) -> None:
        from cllm.formats.kquants import SUB

        if self.qtype not in SUB:
            raise UsageError(f"{self.qtype} is not a K type")

    @property
    def group_size(self) -> int:
        return 256

    @property
    def bits(self) -> int:
        return int(self.qtype[1])

    @property
    def maxq(self) -> int:
        from cllm.formats.kquants import CODES

        lo, hi = CODES[self.qtype]
        return hi - lo

    def group_width(self, cols: int) -> int:
        return 256

    def fit(self, w: torch.Tensor) -> GroupParams:
        from cllm.formats.kquants import SUB, fit_blocks

        kfit = fit_blocks(self.qtype, w.float().contiguous())
        dj, mj = kfit.steps()
        sub = SUB[self.qtype]
        return GroupParams(dj.repeat_interleave(sub, dim=1), mj.repeat_interleave(sub, dim=1), kfit)

    def quantize(self, w: torch.Tensor, p: GroupParams) -> torch.Tensor:
        from cllm.formats.kquants import CODES, HAS_MIN

        lo, hi = CODES[self.qtype]
        live = p.scale != 0
        safe = torch.where(live, p.scale, torch.ones_like(p.scale))
        if HAS_MIN[self.qtype]:
            q = torch.clamp(torch.round((w + p.zero) / safe), lo, hi)
        else:
            q = torch.clamp(torch.round(w / safe), lo, hi) - lo
        # a sub-block whose step is 0 holds one value whatever its codes
        return torch.where(live, q, torch.full_like(q, float(-lo)))

    def dequantize(self, q: torch.Tensor, p: GroupParams) -> torch.Tensor:
        from cllm.formats.kquants import CODES, HAS_MIN

        lo, _hi = CODES[self.qtype]
        if HAS_MIN[self.qtype]:
            return p.scale * q - p.zero
        return p.scale * (q + lo)

    def describe(self) -> str:
        return f"GGUF {self.qtype} grid"


Grid = IntGrid | GGUFGrid | KGrid
# one grid for the model, one per decoder layer (mixed precision), or one per tensor name
# (llama.cpp's K mixes, whose types differ between tensors of a layer)
GridPlan = IntGrid | GGUFGrid | dict[int, GGUFGrid] | dict[str, Grid]


def layer_of(name: str) -> int:
    """Decoder layer index of a tensor name (model.layers.<i>. ...)."""
    return int(name.split(".")[2])


def grid_for(plan: GridPlan, layer: int, name: str | None = None) -> Grid:
    """The grid of one tensor (`name`) or one layer's tensors."""
    if not isinstance(plan, dict):
        return plan
    if name is not None and name in plan:
        return plan[name]  # type: ignore[index]
    return plan[layer]  # type: ignore[index]


def n_groups(cols: int, group: int) -> int:
    """Groups per row; the last one is shorter when `group` does not divide `cols` (as in GPTQ)."""
    return -(-cols // group)


# Shrink factors tried by the clipping search: 1.0 down to 0.5 in steps of 0.025. The GPTQ
# reference tries 80 (down to 0.2); past 0.5 nothing was ever picked on SmolLM2, and each step
# costs a quantize pass over the group.
CLIP_SHRINKS = tuple(1 - i / 40 for i in range(21))
CLIP_NORM = 2.4  # the GPTQ reference's error norm: between MSE and max-error


def fit_clipped(grid: Grid, w: torch.Tensor, clip: bool = False) -> GroupParams:
    """Group parameters, optionally with the range shrunk where that lowers the rounding error.

    Min-max scales waste levels on the rare extreme weights of a group; at 3 bits that
    dominates the error. With `clip`, each row of `w` [rows, group] gets the shrink factor
    (of `CLIP_SHRINKS`) whose quantized values are closest to the weights in the
    `CLIP_NORM` norm. Every factor yields a valid grid of the same format, so GGUF blocks
    stay standard.
    """
    best = grid.fit(w)
    if not clip or isinstance(grid, KGrid):  # the K reference searches its own ranges
        return best
    err = _group_error(grid, w, best)
    for s in CLIP_SHRINKS[1:]:
        p = grid.fit(w * s)
        e = _group_error(grid, w, p)
        better = (e < err).unsqueeze(1)
        best = GroupParams(
            torch.where(better, p.scale, best.scale), torch.where(better, p.zero, best.zero)
        )
        err = torch.minimum(e, err)
    return best


def _group_error(grid: Grid, w: torch.Tensor, p: GroupParams) -> torch.Tensor:
    return (grid.dequantize(grid.quantize(w, p), p) - w).abs_().pow_(CLIP_NORM).sum(dim=1)


def quantize_rtn(
    w: torch.Tensor, grid: Grid, clip: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest of a 2-D weight: (codes, scales [rows, groups], zeros [rows, groups])."""
    if isinstance(grid, KGrid):
        raise UsageError(f"round-to-nearest on the {grid.qtype} grid goes through llama.cpp")
    rows, cols = w.shape
    g = grid.group_width(cols)
    w = w.float()
    full = cols // g
    parts = []
    if full:
        flat = w[:, : full * g].reshape(
            rows * full, g
        )  # every group becomes a row: one vectorised fit
        p = fit_clipped(grid, flat, clip)
        parts.append(
            (
                grid.quantize(flat, p).reshape(rows, full * g),
                p.scale.reshape(rows, full),
                p.zero.reshape(rows, full),
            )
        )
    if cols % g:
        if isinstance(grid, GGUFGrid):
            raise UsageError(f"row length {cols} is not a multiple of the {grid.qtype} block of 32")
        tail = w[:, full * g :]
        p = fit_clipped(grid, tail, clip)
        parts.append((grid.quantize(tail, p), p.scale, p.zero))
    codes = torch.cat([c for c, _, _ in parts], dim=1)
    return (
        codes,
        torch.cat([s for _, s, _ in parts], dim=1),
        torch.cat([z for _, _, z in parts], dim=1),
    )


def dequantize_groups(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int
) -> torch.Tensor:
    """scale * (code - zero), each scale covering `group` columns (the last group may be shorter)."""
    cols = codes.shape[1]
    if scales.shape[1] == 1:
        group = cols
    s = scales.repeat_interleave(group, dim=1)[:, :cols]
    z = zeros.repeat_interleave(group, dim=1)[:, :cols]
    return s * (codes - z)
