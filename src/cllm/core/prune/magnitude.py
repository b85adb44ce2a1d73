"""Magnitude pruning: zero the smallest |W| of each output row.

The baseline every calibrated method is measured against, and the only one that needs no
data: without `--profile owl` it streams, each pruned tensor computed when the writer asks
for it, so memory stays near one tensor whatever the model size.

Magnitudes are compared within each output row, not across the whole matrix. Per-row is
what Wanda found works better for LLMs at the same budget, it makes every method here
remove the same count from every row (so their results differ only in *which* weights go),
and it is the only comparison N:M can use anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cllm.core.prune.base import PRUNERS, PruneContext, PrunedModel, UnstructuredScope
from cllm.core.prune.layerwise import (
    build_report,
    expected_zeros,
    layer_index,
    layer_sparsities,
    pruned_model,
    select_scope,
)
from cllm.core.prune.masks import apply_mask, select_mask

if TYPE_CHECKING:
    from cllm.formats.checkpoint import Checkpoint


@dataclass
class MagnitudeConfig(UnstructuredScope):
    """Magnitude pruning; calibration data only for `--profile owl` (to measure outliers)."""

    def needs_calibration(self) -> bool:
        return self.profile == "owl"


def magnitude_prune(
    weight: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None
) -> torch.Tensor:
    """`weight` (in its own dtype) with the smallest magnitudes of each row (or of each group
    of M input columns in each row) set to zero."""
    return apply_mask(weight, select_mask(weight.float().abs(), sparsity, nm))


@PRUNERS.register("magnitude", MagnitudeConfig)
def prune_magnitude(ckpt: Checkpoint, cfg: MagnitudeConfig, ctx: PruneContext) -> PrunedModel:
    scope = select_scope(ckpt, cfg)
    targets, extra = layer_sparsities(ckpt, cfg, ctx, scope, progress=ctx.on_layer)
    nm = cfg.nm()

    def produce(name: str) -> torch.Tensor:
        return magnitude_prune(ckpt.get(name), targets[layer_index(name)], nm)

    # the output is never held, so the report counts what the masks remove (exact per row),
    # known from shapes alone; an input with zeros of its own can only have more
    report = build_report(
        "magnitude", cfg, scope, targets, expected_zeros(scope, targets, cfg), extra
    )
    return pruned_model(ckpt, scope, produce, report)
