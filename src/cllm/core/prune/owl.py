"""Outlier-Weighted Layerwise sparsity (OWL, Yin et al., 2023): prune layers unevenly.

LLM layers differ in how many "outlier" weights they hold, weights whose Wanda score
|W_ij| * ||X_j|| is far above the layer's mean. Layers rich in outliers lose more when
pruned, so OWL gives them more density and takes it from the others, keeping the overall
sparsity at the target. The outlier share is measured once, on the dense model, before any
pruning; the method that follows (magnitude, Wanda or SparseGPT) then prunes layer i at its
own sparsity s_i.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from cllm.core.prune.layerwise import Scope, measure_dense_inputs
from cllm.core.prune.wanda import wanda_scores

if TYPE_CHECKING:
    from cllm.core.calib import Calibration
    from cllm.core.prune.base import UnstructuredScope
    from cllm.formats.checkpoint import Checkpoint


def owl_sparsities(
    outlier_ratios: Sequence[float],
    target: float,
    lam: float,
    weights: Sequence[float] | None = None,
) -> list[float]:
    """Per-layer sparsities from per-layer outlier ratios.

    The ratios are mapped linearly onto densities in [1 - target - lam, 1 - target + lam]
    (the layer with the most outliers gets the highest density, i.e. sparsity target - lam),
    then shifted by one constant so the mean sparsity weighted by `weights` (each layer's
    pruned parameter count) equals `target`: weighting by parameters is what keeps the
    *overall* fraction of pruned weights at the target, and since every decoder layer of a
    Llama has the same size it equals the plain mean there. Where the shift would take a
    layer outside [target - lam, target + lam] it is held at the bound and the others move
    a little further, so the range promise and the exact mean both hold (the order of the
    layers never changes).
    """
    n = len(outlier_ratios)
    if n == 0:
        return []
    w = torch.tensor([1.0] * n if weights is None else list(weights), dtype=torch.float64)
    if w.shape[0] != n or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError("weights must be one non-negative number per layer, not all zero")
    r = torch.tensor(list(outlier_ratios), dtype=torch.float64)
    spread = float(r.max() - r.min())
    if lam == 0 or spread == 0:
        return [float(target)] * n
    lo, hi = target - lam, target + lam
    base = hi - 2 * lam * (r - r.min()) / spread
    w = w / w.sum()

    def mean_at(c: float) -> float:
        return float((w * (base + c).clamp(lo, hi)).sum())

    a, b = -2 * lam, 2 * lam  # mean_at(a) = lo <= target <= hi = mean_at(b)
    for _ in range(100):
        c = (a + b) / 2
        if mean_at(c) < target:
            a = c
        else:
            b = c
    c = (a + b) / 2
    # solve exactly on the layers the bounds do not hold, so the mean is the target to rounding
    s = (base + c).clamp(lo, hi)
    free = (base + c > lo) & (base + c < hi)
    w_free = float(w[free].sum())
    if w_free > 0:
        fixed = float((w[~free] * s[~free]).sum())
        c_exact = (target - fixed - float((w[free] * base[free]).sum())) / w_free
        s[free] = (base[free] + c_exact).clamp(lo, hi)
    return [float(x) for x in s]


def layer_outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    """The share of a layer's scores (over all its pruned Linears) above m x their mean."""
    total = sum(int(s.numel()) for s in scores)
    if total == 0:
        return 0.0
    mean = sum(float(s.double().sum()) for s in scores) / total
    above = sum(int((s > m * mean).sum()) for s in scores)
    return above / total


def measure_outlier_ratios(
    ckpt: Checkpoint,
    cfg: UnstructuredScope,
    calib: Calibration,
    scope: Scope,
    progress: Callable[[int, int], None] | None = None,
) -> dict[int, float]:
    """Each pruned layer's outlier ratio under Wanda scores, in one pass over the dense model
    (every layer sees dense inputs: OWL ranks the layers of the model being pruned, not of
    a half-pruned one)."""
    ratios: dict[int, float] = {}

    def measure(i: int, linears: dict[str, torch.nn.Linear], sums: dict[str, torch.Tensor]) -> None:
        scores = [wanda_scores(mod.weight.data, sums[n]) for n, mod in linears.items()]
        ratios[i] = layer_outlier_ratio(scores, cfg.owl_m)

    measure_dense_inputs(ckpt, cfg, calib, scope, measure, progress=progress)
    return ratios
