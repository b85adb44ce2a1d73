"""Per-layer sensitivity to quantization, and bit allocation under a budget.

Sensitivity of layer i at type t = mean KL divergence (base || model) over the scored
positions of a few calibration chunks, when only layer i's Linear weights are rounded to t
(measured by `cllm.core.sensitivity.kld_map`).

Allocation picks one type per layer to minimise the summed sensitivity under a bit
budget (a multiple-choice knapsack, solved greedily by best KLD saved per extra bit,
which is what the additive approximation supports).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cllm.core.heatmap import heatmap
from cllm.core.quantize.grid import (
    GGUF_GRIDS,
    GGUFGrid,
    Grid,
    GroupParams,
    IntGrid,
    dequantize_groups,
    quantize_rtn,
)
from cllm.core.sensitivity import kld_map, layer_linears
from cllm.errors import UsageError
from cllm.formats.checkpoint import Checkpoint

# storage cost of each llama.cpp block type, bits per weight (32 weights + fp16 scale [+ fp16 min])
TYPE_BPW = {"Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5, "Q5_1": 6.0, "Q8_0": 8.5}


@dataclass
class SensitivityReport:
    candidates: list[str]
    layers: int
    kld: list[list[float]]  # [layer][candidate]
    layer_params: list[int]  # quantized weights per layer
    protocol: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SensitivityReport:
        return cls(**{k: d[k] for k in ("candidates", "layers", "kld", "layer_params", "protocol")})


# int grids (INT3 = 3-bit, group 128, symmetric; INT3G64 = group 64) are measured for the
# heat map only: mixed precision allocates llama.cpp types, which have a storage cost
_INT_CANDIDATE = re.compile(r"INT([2-8])(?:G(32|64|128|256))?")


def candidate_grid(name: str) -> Grid:
    if name in GGUF_GRIDS:
        return GGUFGrid(name)
    m = _INT_CANDIDATE.fullmatch(name)
    if m is None:
        raise UsageError(
            f"sensitivity candidate {name} is not supported",
            "Use Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, or INT2 ... INT8 with an optional group (INT3G64)",
        )
    return IntGrid(bits=int(m.group(1)), group_size=int(m.group(2) or 128))


def check_candidates(candidates: list[str], mixed: bool = False) -> None:
    """A sensitivity map measures GGUF legacy types and int grids; mixed precision (which
    checks its GGUF types where it plans) refuses the int grids, which have no llama.cpp type."""
    if not candidates:
        raise UsageError("--candidates is empty", "e.g. --candidates Q4_0,Q5_0,Q8_0")
    for c in candidates:
        if mixed:
            if _INT_CANDIDATE.fullmatch(c):
                raise UsageError(
                    f"mixed precision cannot choose {c}: it is not a llama.cpp type",
                    "Int candidates are for --sensitivity maps; mix among llama.cpp types",
                )
        else:
            candidate_grid(c)


def measure_sensitivity(
    ckpt: Checkpoint,
    chunks: list[np.ndarray],
    candidates: list[str],
    on_step: Callable[[int, int], None] | None = None,
) -> SensitivityReport:
    from cllm.core.eval.backends import build_torch_model

    check_candidates(candidates)
    model = build_torch_model(ckpt)
    params = [sum(m.weight.numel() for m in layer_linears(model, i).values())
              for i in range(len(model.model.layers))]  # fmt: skip

    def round_layer(model: Any, i: int, column: str, _probe: Any) -> Callable[[], None]:
        grid = candidate_grid(column)
        linears = layer_linears(model, i)
        originals = {n: m.weight.data for n, m in linears.items()}
        for n, m in linears.items():
            codes, scales, zeros = quantize_rtn(originals[n], grid)
            if isinstance(grid, IntGrid):
                width = grid.group_width(codes.shape[1])
                m.weight.data = dequantize_groups(codes, scales, zeros, width)
                continue
            per_col = GroupParams(scales.repeat_interleave(32, 1), zeros.repeat_interleave(32, 1))
            m.weight.data = grid.dequantize(codes, per_col)

        def restore() -> None:
            for n, m in linears.items():
                m.weight.data = originals[n]

        return restore

    kld = kld_map(ckpt, chunks, list(candidates), round_layer, on_step, model=model)
    return SensitivityReport(list(candidates), len(params), kld, params)


def allocate(report: SensitivityReport, budget_bits: float) -> list[str]:
    """One type per layer minimising summed KLD with sum(params * bpw) <= budget_bits."""
    cands = sorted(report.candidates, key=lambda c: TYPE_BPW[c])
    idx = {c: report.candidates.index(c) for c in cands}
    choice = [0] * report.layers  # index into cands, start at the cheapest
    used = sum(p * TYPE_BPW[cands[0]] for p in report.layer_params)
    if used > budget_bits + 1e-6:
        cheapest = cands[0]
        raise UsageError(
            f"the budget is below what the cheapest type ({cheapest}) needs",
            f"Raise the target to at least {TYPE_BPW[cheapest]} bits per weight",
        )
    while True:
        best = None
        for i in range(report.layers):
            k = choice[i]
            for k2 in range(k + 1, len(cands)):
                extra = report.layer_params[i] * (TYPE_BPW[cands[k2]] - TYPE_BPW[cands[k]])
                if used + extra > budget_bits + 1e-6:
                    continue
                gain = report.kld[i][idx[cands[k]]] - report.kld[i][idx[cands[k2]]]
                ratio = gain / extra
                if gain > 0 and (best is None or ratio > best[0]):
                    best = (ratio, i, k2, extra)
        if best is None:
            break
        _, i, k2, extra = best
        choice[i] = k2
        used += extra
    return [cands[k] for k in choice]


def heatmap_png(report: SensitivityReport, path: Any) -> None:
    heatmap(
        report.kld, report.candidates, "type", "KLD when only this layer is quantized (log10)", path
    )
