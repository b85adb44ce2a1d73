"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each
column's rounding error onto the not-yet-quantized columns through the inverse
Hessian of the layer's inputs, so the layer's *output* error is minimised.

Works on any `Grid`, so the same code produces packed int weights or the exact
blocks of a llama.cpp type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cllm.core.quantize.grid import GGUFGrid, Grid, GroupParams, fit_clipped
from cllm.errors import RuntimeFailure


class HessianAccumulator:
    """H = 2/n * sum x x^T over every input row seen, accumulated in float32.

    H is symmetric, so `add` computes only the blocks on and right of the diagonal (in
    column strips of `STRIP`) and `H` mirrors them on read: 40% fewer flops for these
    products, which were a third of a GPTQ run on SmolLM2. (bf16 products would be 4x
    faster still, but rounding their sums to bf16 left Hessians that damping could not
    make positive definite next to the model's outlier channels.)
    """

    STRIP = 192

    def __init__(self, dim: int) -> None:
        self._H = torch.zeros(dim, dim, dtype=torch.float32)
        self._mirrored = True
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        if m == 0:
            return
        self._H *= self.n / (self.n + m)
        self.n += m
        x = x * math.sqrt(2 / self.n)
        dim = x.shape[1]
        for i in range(0, dim, self.STRIP):
            self._H[i : i + self.STRIP, i:].addmm_(x[:, i : i + self.STRIP].t(), x[:, i:])
        self._mirrored = dim <= self.STRIP

    @property
    def H(self) -> torch.Tensor:
        if not self._mirrored:
            dim = self._H.shape[0]
            for i in range(0, dim, self.STRIP):
                j = i + self.STRIP
                self._H[j:, i:j] = self._H[i:j, j:].t()
            self._mirrored = True
        return self._H


@dataclass
class GPTQResult:
    codes: torch.Tensor  # [rows, cols] float holding integer codes
    scales: torch.Tensor  # [rows, groups]
    zeros: torch.Tensor  # [rows, groups]
    weight: torch.Tensor  # dequantized [rows, cols]


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    grid: Grid,
    act_order: bool = False,
    damp: float = 0.01,
    blocksize: int = 128,
    clip: bool = False,
) -> GPTQResult:
    """Quantize `W` [rows, cols] given the input Hessian `H` [cols, cols].

    Group scales are fitted on each group's weights as updated by the error
    feedback so far (groups are contiguous column ranges). With `act_order`,
    columns are visited by decreasing Hessian diagonal, and group scales are
    fitted up front on the original weights ("static groups") so groups stay
    contiguous in the stored layout. `clip` searches each group's range for the lowest
    rounding error (see `fit_clipped`) instead of taking its min and max.
    """
    W = W.detach().float().clone()
    rows, cols = W.shape
    g = grid.group_width(cols)
    if cols % g and isinstance(grid, GGUFGrid):
        raise RuntimeFailure(f"row length {cols} is not a multiple of the {grid.qtype} block of 32")
    n_groups = -(-cols // g)  # a shorter last group when g does not divide cols
    blocksize = (
        max(blocksize // g, 1) * g
    )  # a block holds whole groups, so a group never waits on lazy updates
    H = H.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    static: list[GroupParams] | None = None
    perm: torch.Tensor | None = None
    invperm: torch.Tensor | None = None
    if act_order:
        static = _static_groups(W, grid, g, clip)
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = torch.argsort(perm)

    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols)
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.cholesky_inverse(L)
        Hinv = torch.linalg.cholesky(Hinv, upper=True)
    except RuntimeError as exc:  # not positive definite even after damping
        raise RuntimeFailure(
            "GPTQ: the Hessian is not positive definite",
            "Raise --damp or use more calibration samples",
        ) from exc

    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)
    scales = torch.zeros(rows, n_groups)
    zeros = torch.zeros(rows, n_groups)
    current: GroupParams | None = None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        C1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            col = i1 + i
            w = W1[:, i]
            d = Hinv1[i, i]
            if static is not None:
                assert perm is not None
                gi = int(perm[col]) // g
                p = static[gi]
            else:
                gi = col // g
                if col % g == 0:
                    # the group as updated by the error feedback so far
                    current = fit_clipped(grid, W1[:, i : i + g], clip)
                assert current is not None
                p = current
            q = grid.quantize(w.unsqueeze(1), p)
            deq = grid.dequantize(q, p)[:, 0]
            scales[:, gi] = p.scale[:, 0]
            zeros[:, gi] = p.zero[:, 0]
            C1[:, i] = q[:, 0]
            Q1[:, i] = deq
            err = (w - deq) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        codes[:, i1:i2] = C1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if invperm is not None:
        Q = Q[:, invperm]
        codes = codes[:, invperm]
    return GPTQResult(codes, scales, zeros, Q)


def _static_groups(W: torch.Tensor, grid: Grid, g: int, clip: bool) -> list[GroupParams]:
    """Each group's parameters fitted on the original weights, all full groups in one call
    (the fit is row-wise, so this equals fitting group by group)."""
    rows, cols = W.shape
    full = cols // g
    groups: list[GroupParams] = []
    if full:
        p = fit_clipped(grid, W[:, : full * g].reshape(rows * full, g), clip)
        s, z = p.scale.reshape(rows, full), p.zero.reshape(rows, full)
        groups = [GroupParams(s[:, j : j + 1], z[:, j : j + 1]) for j in range(full)]
    if cols % g:
        groups.append(fit_clipped(grid, W[:, full * g :], clip))
    return groups
