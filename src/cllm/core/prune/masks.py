"""Sparsity masks from importance scores: pure tensor functions every method shares.

A mask is a bool tensor shaped like the weight, True where the weight is kept. Masks are
chosen within each output row (never across the whole matrix): every output neuron keeps
the same number of inputs, so the achieved sparsity is exact and no row is emptied by a
few large rows elsewhere (Wanda's finding that per-output comparison beats per-layer for
LLMs). Ties are broken by column index (the earlier column is pruned first), so the same
scores always give the same mask, whatever the thread count.
"""

from __future__ import annotations

import math

import torch

from cllm.errors import UsageError


def pruned_per_row(cols: int, sparsity: float) -> int:
    """How many of a row's `cols` weights a `sparsity` removes: floor, so a requested
    fraction is never exceeded (the 1e-9 guards against 0.3 * 10 = 2.9999999999999996)."""
    return min(cols, max(0, math.floor(sparsity * cols + 1e-9)))


def lowest_indices(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k lowest scores of each row (last dim), ties to the lower index.

    NaN scores sort last and so are kept: a NaN means a broken statistic, not importance,
    and hiding it by zeroing the weight would make the failure silent downstream.
    """
    order = torch.argsort(score, dim=-1, stable=True)
    return order[..., :k]


def unstructured_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep all but the floor(sparsity * cols) lowest-scored weights of each row."""
    if score.dim() != 2:
        raise ValueError(f"scores must be a matrix, got shape {tuple(score.shape)}")
    k = pruned_per_row(score.shape[1], sparsity)
    mask = torch.ones(score.shape, dtype=torch.bool)
    if k:
        mask.scatter_(1, lowest_indices(score.float(), k), False)
    return mask


def check_nm(cols: int, n: int, m: int, what: str = "a weight row") -> None:
    """N:M groups tile a row exactly or not at all: a partial last group has no meaning
    for the hardware kernels the pattern exists for."""
    if not 0 < n < m:
        raise UsageError(f"pattern {n}:{m}: N must be at least 1 and smaller than M", "e.g. 2:4")
    if cols % m:
        raise UsageError(
            f"{what} has {cols} input weights, which groups of {m} do not tile",
            f"Choose an M that divides {cols}, or --keep that tensor dense",
        )


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the N highest-scored of every M consecutive input columns in each row."""
    if score.dim() != 2:
        raise ValueError(f"scores must be a matrix, got shape {tuple(score.shape)}")
    rows, cols = score.shape
    check_nm(cols, n, m)
    groups = score.float().reshape(rows, cols // m, m)
    mask = torch.ones(groups.shape, dtype=torch.bool)
    mask.scatter_(2, lowest_indices(groups, m - n), False)
    return mask.reshape(rows, cols)


def select_mask(
    score: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None
) -> torch.Tensor:
    """The N:M mask when a pattern is given, else the per-row unstructured one."""
    return nm_mask(score, *nm) if nm else unstructured_mask(score, sparsity)


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`weight` with the masked-out entries set to exactly +0 (a product would keep -0.0 and
    turn inf into NaN), in the weight's own dtype."""
    if mask.shape != weight.shape:
        raise ValueError(f"mask {tuple(mask.shape)} does not match weight {tuple(weight.shape)}")
    return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype))
