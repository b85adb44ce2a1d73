"""Per-layer sparsities from a measured sensitivity map (`--profile FILE`).

A layer whose pruning costs more KLD should keep more of its weights. The map's layer
score is the sum of its sublayers' KLD; scores are compared on a log scale (KLD spans
orders of magnitude between the first and the middle layers) and spread linearly over
[target - lambda, target + lambda], the least sensitive layer getting the most sparsity,
as OWL spreads its outlier ratios. A final shift makes the parameter-weighted mean equal
the target exactly, so the overall sparsity is what was asked for.
"""

from __future__ import annotations

import math


def balance(sparsity: list[float], weights: list[int], target: float) -> list[float]:
    """Shift `sparsity` so its `weights`-weighted mean is `target`, keeping each value in
    [0, 0.99] (values pinned at a bound are held there while the rest absorb the shift)."""
    s = list(sparsity)
    total = float(sum(weights))
    for _ in range(50):
        mean = sum(x * w for x, w in zip(s, weights, strict=True)) / total
        gap = target - mean
        if abs(gap) < 1e-12:
            break
        free = [i for i, x in enumerate(s) if (gap > 0 and x < 0.99) or (gap < 0 and x > 0.0)]
        if not free:
            break
        share = sum(weights[i] for i in free)
        for i in free:
            s[i] = min(0.99, max(0.0, s[i] + gap * total / share))
    return s


def sparsities_from_sensitivity(
    kld: list[list[float]], layer_params: list[int], target: float, lam: float
) -> list[float]:
    scores = [math.log10(max(sum(row), 1e-12)) for row in kld]
    lo, hi = min(scores), max(scores)
    if hi - lo < 1e-12:
        return [target] * len(scores)
    spread = [target + lam - 2 * lam * (x - lo) / (hi - lo) for x in scores]
    return balance(spread, layer_params, target)
