"""Wanda (Sun et al., 2023): prune by |W_ij| * ||X_j||_2, compared within each output row.

A weight matters as much as the signal it multiplies: a small weight on an input channel
with large activations (LLMs have a few such outlier channels) can move the output more
than a large weight on a quiet one. The score needs only each input column's norm over the
calibration tokens, so there is no Hessian and no weight update: the cheapest calibrated
method, and the one OWL uses to find a layer's outliers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cllm.core.prune.base import PRUNERS, PruneContext, PrunedModel, UnstructuredScope
from cllm.core.prune.layerwise import collect_input_sumsq, column_sumsq, prune_by_layer
from cllm.core.prune.masks import apply_mask, select_mask

if TYPE_CHECKING:
    from cllm.formats.checkpoint import Checkpoint


@dataclass
class WandaConfig(UnstructuredScope):
    """Wanda: one calibration pass per layer, no weight update."""


def wanda_scores(weight: torch.Tensor, col_sumsq: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2, from each input column's sum of squares over all tokens."""
    norms = col_sumsq.double().clamp(min=0).sqrt().float()
    return weight.float().abs() * norms.unsqueeze(0)


def wanda_prune(
    weight: torch.Tensor,
    col_sumsq: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
) -> torch.Tensor:
    """`weight` (float32) with the lowest Wanda scores of each row (or of each group of M
    input columns in each row) set to zero."""
    mask = select_mask(wanda_scores(weight, col_sumsq), sparsity, nm)
    return apply_mask(weight.float(), mask)


def input_sumsq(inputs: list[torch.Tensor]) -> torch.Tensor:
    """Each input column's sum of squares over every row of `inputs` (float64), summed batch
    by batch in order, exactly as the two-pass hooks sum them."""
    total = torch.zeros(inputs[0].shape[-1], dtype=torch.float64)
    for x in inputs:
        total += column_sumsq(x)
    return total


@PRUNERS.register("wanda", WandaConfig)
def prune_wanda(ckpt: Checkpoint, cfg: WandaConfig, ctx: PruneContext) -> PrunedModel:
    nm = cfg.nm()
    return prune_by_layer(
        "wanda", ckpt, cfg, ctx, collect_input_sumsq,
        lambda w, sums, sparsity: wanda_prune(w, sums, sparsity, nm), input_sumsq,
    )  # fmt: skip
