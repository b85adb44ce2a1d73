"""The optimal-brain-surgeon sweep GPTQ and SparseGPT share (Frantar et al., 2022 and 2023).

Columns of a weight matrix are visited left to right; each column is replaced by what a
`ColumnRule` decides (rounded to a grid for GPTQ, masked to zero for SparseGPT, both for
the two combined) and the error that replacement makes is pushed onto the columns not yet
visited through the inverse Hessian of the layer's inputs, so the *output* error stays
small. Work is done in blocks of columns: inside a block the update is column by column,
the rest of the matrix is updated once per block.
"""

from __future__ import annotations

from typing import Protocol

import torch

from cllm.errors import RuntimeFailure


class ColumnRule(Protocol):
    def begin_block(self, i1: int, W1: torch.Tensor, Hinv1: torch.Tensor) -> None:
        """Called when columns [i1, i1 + W1.shape[1]) start; W1 holds them as updated so far."""

    def column(self, col: int, i: int, W1: torch.Tensor, Hinv1: torch.Tensor) -> torch.Tensor:
        """The value column `col` (index `i` inside the block) takes; W1 is the current block."""


def prepare_hessian(
    W: torch.Tensor, H: torch.Tensor, damp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W with dead input columns zeroed, damped H): a column no calibration token ever
    activated has a zero Hessian row; its weight cannot matter and is set to zero."""
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0])
    return W, H


def inverse_hessian_factor(H: torch.Tensor, what: str = "GPTQ") -> torch.Tensor:
    """The upper Cholesky factor of H^-1, whose rows are the sweep's update directions."""
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.cholesky_inverse(L)
        return torch.linalg.cholesky(Hinv, upper=True)
    except RuntimeError as exc:  # not positive definite even after damping
        raise RuntimeFailure(
            f"{what}: the Hessian is not positive definite",
            "Raise --damp or use more calibration samples",
        ) from exc


def obs_sweep(
    W: torch.Tensor, Hinv: torch.Tensor, rule: ColumnRule, blocksize: int = 128
) -> torch.Tensor:
    """Run the sweep over W (modified in place as the error propagates); returns the matrix
    of the values the rule chose."""
    rows, cols = W.shape
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        rule.begin_block(i1, W1, Hinv1)
        for i in range(i2 - i1):
            w = W1[:, i]
            q = rule.column(i1 + i, i, W1, Hinv1)
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q
