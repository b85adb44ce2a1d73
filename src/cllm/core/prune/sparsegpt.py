"""SparseGPT (Frantar and Alistarh, 2023): prune with the OBS sweep GPTQ uses, so every
removed weight's error is pushed onto the input columns not yet visited and the layer's
*output* (not its weights) stays close to the dense one.

The mask is chosen as the sweep goes ("adaptive mask selection"): at the start of each block
of columns, each row drops the weights of that block with the smallest OBS error
w^2 / [H^-1]_jj^2, computed on the weights as already updated by the earlier blocks. Each
block removes its share of the row's budget (floor(s * end) - floor(s * start) weights), so
every row ends at exactly floor(s * cols) zeros. With N:M the choice is made group by group
as the sweep reaches each group of M columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cllm.core.obs import inverse_hessian_factor, obs_sweep, prepare_hessian
from cllm.core.prune.base import PRUNERS, PruneContext, PrunedModel, UnstructuredScope
from cllm.core.prune.layerwise import prune_by_layer
from cllm.core.prune.masks import check_nm, lowest_indices, pruned_per_row
from cllm.errors import UsageError

if TYPE_CHECKING:
    from cllm.formats.checkpoint import Checkpoint


@dataclass
class SparseGPTConfig(UnstructuredScope):
    """SparseGPT: a Hessian per Linear input, then the OBS sweep with a masking rule."""

    damp: float = 0.01  # added to H's diagonal, as a fraction of its mean
    blocksize: int = 128  # columns per lazy update (and per mask choice when unstructured)

    def validate(self) -> None:
        super().validate()
        if not 0 < self.damp < 1:
            raise UsageError(
                f"--damp {self.damp} is out of range", "Use a value in (0, 1), e.g. 0.01"
            )
        if self.blocksize < 1:
            raise UsageError(f"--blocksize {self.blocksize} must be at least 1", "e.g. 128")


class _MaskingRule:
    """SparseGPT's step of the OBS sweep: the column, with its pruned weights set to zero."""

    def __init__(self, rows: int, cols: int, sparsity: float, nm: tuple[int, int] | None) -> None:
        self.sparsity, self.nm = sparsity, nm
        self.mask = torch.ones(rows, cols, dtype=torch.bool)

    def begin_block(self, i1: int, W1: torch.Tensor, Hinv1: torch.Tensor) -> None:
        if self.nm:
            return
        i2 = i1 + W1.shape[1]
        k = pruned_per_row(i2, self.sparsity) - pruned_per_row(i1, self.sparsity)
        if k:
            score = W1.square() / torch.diag(Hinv1).square().unsqueeze(0)
            self.mask[:, i1:i2].scatter_(1, lowest_indices(score, k), False)

    def column(self, col: int, i: int, W1: torch.Tensor, Hinv1: torch.Tensor) -> torch.Tensor:
        if self.nm:
            n, m = self.nm
            if col % m == 0:
                d = torch.diag(Hinv1)[i : i + m]
                score = W1[:, i : i + m].square() / d.square().unsqueeze(0)
                self.mask[:, col : col + m].scatter_(1, lowest_indices(score, m - n), False)
        return torch.where(self.mask[:, col], W1[:, i], torch.zeros((), dtype=W1.dtype))


def sparsegpt_prune(
    weight: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    damp: float = 0.01,
    blocksize: int = 128,
) -> torch.Tensor:
    """`weight` [rows, cols] pruned to `sparsity` (or N:M) with the kept weights updated to
    compensate, given the Hessian `H` [cols, cols] of the Linear's inputs; float32."""
    rows, cols = weight.shape
    if nm:
        check_nm(cols, *nm)
        # a block holds whole groups, so a group is chosen on fully updated weights
        blocksize = max(blocksize // nm[1], 1) * nm[1]
    W, Hd = prepare_hessian(weight, H, damp)
    Hinv = inverse_hessian_factor(Hd, "SparseGPT")
    return obs_sweep(W, Hinv, _MaskingRule(rows, cols, sparsity, nm), blocksize)


@PRUNERS.register("sparsegpt", SparseGPTConfig)
def prune_sparsegpt(ckpt: Checkpoint, cfg: SparseGPTConfig, ctx: PruneContext) -> PrunedModel:
    from cllm.core.quantize.gptq import HessianAccumulator
    from cllm.core.quantize.gptq_layerwise import collect_hessians

    def hessian(inputs: list[torch.Tensor]) -> HessianAccumulator:
        acc = HessianAccumulator(inputs[0].shape[-1])
        for x in inputs:  # batch order, as the two-pass hooks add them
            acc.add(x)
        return acc

    nm = cfg.nm()
    return prune_by_layer(
        "sparsegpt", ckpt, cfg, ctx, collect_hessians,
        lambda w, acc, sparsity: sparsegpt_prune(w, acc.H, sparsity, nm, cfg.damp, cfg.blocksize),
        hessian,
    )  # fmt: skip
