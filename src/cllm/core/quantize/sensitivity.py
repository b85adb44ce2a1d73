"""Per-layer sensitivity to quantization, and bit allocation under a budget.

Sensitivity of layer i at type t = mean KL divergence (base || model) over the scored
positions of a few evaluation chunks, when only layer i's Linear weights are rounded to t.
Hidden states entering every layer are cached from one base pass, so each measurement
only re-runs the layers from i onwards.

Allocation picks one type per layer to minimise the summed sensitivity under a bit
budget (a multiple-choice knapsack, solved greedily by best KLD saved per extra bit,
which is what the additive approximation supports).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from cllm.core.quantize.grid import GGUF_GRIDS, GGUFGrid, GroupParams, quantize_rtn
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


def _layer_linears(model: Any, i: int) -> dict[str, torch.nn.Linear]:
    layer = model.model.layers[i]
    return {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


@torch.inference_mode()
def measure_sensitivity(
    ckpt: Checkpoint,
    chunks: list[np.ndarray],
    candidates: list[str],
    on_step: Callable[[int, int], None] | None = None,
) -> SensitivityReport:
    from cllm.core.eval.backends import build_torch_model

    for c in candidates:
        if c not in GGUF_GRIDS:
            raise UsageError(
                f"sensitivity candidate {c} is not supported", "Use Q4_0, Q4_1, Q5_0, Q5_1, Q8_0"
            )
    model = build_torch_model(ckpt)
    layers = model.model.layers
    n_layers = len(layers)
    ctx = len(chunks[0])
    first = ctx // 2
    ids = torch.as_tensor(np.stack(chunks)).long()
    captured: list[torch.Tensor] = []

    def grab(_m: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    handles = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in layers]
    try:
        base_logits = model(input_ids=ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    base_lp = torch.log_softmax(base_logits[:, first : ctx - 1].float(), dim=-1)
    base_p = base_lp.exp()
    pos = torch.arange(ctx)[None]
    pe = model.model.rotary_emb(captured[0], pos)

    def tail_kld(i: int) -> float:
        x = captured[i]
        for layer in layers[i:]:
            y = layer(x, attention_mask=None, position_ids=pos, position_embeddings=pe)
            x = y[0] if isinstance(y, tuple) else y
        logits = model.lm_head(model.model.norm(x))
        lp = torch.log_softmax(logits[:, first : ctx - 1].float(), dim=-1)
        return float((base_p * (base_lp - lp)).sum(-1).mean())

    kld = [[0.0] * len(candidates) for _ in range(n_layers)]
    params = []
    total = n_layers * len(candidates)
    step = 0
    for i in range(n_layers):
        linears = _layer_linears(model, i)
        originals = {n: m.weight.data.clone() for n, m in linears.items()}
        params.append(sum(w.numel() for w in originals.values()))
        for j, c in enumerate(candidates):
            grid = GGUFGrid(c)
            for n, m in linears.items():
                codes, scales, zeros = quantize_rtn(originals[n], grid)
                per_col = GroupParams(
                    scales.repeat_interleave(32, 1), zeros.repeat_interleave(32, 1)
                )
                m.weight.data = grid.dequantize(codes, per_col)
            kld[i][j] = tail_kld(i)
            step += 1
            if on_step:
                on_step(step, total)
        for n, m in linears.items():
            m.weight.data = originals[n]
    return SensitivityReport(list(candidates), n_layers, kld, params)


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
    """Layers x types heat map of log10 KLD (matplotlib, imported only here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = np.log10(np.maximum(np.array(report.kld), 1e-8))
    fig, ax = plt.subplots(figsize=(2 + 1.1 * len(report.candidates), 1.5 + 0.22 * report.layers))
    im = ax.imshow(data, aspect="auto", cmap="magma_r")
    ax.set_xticks(range(len(report.candidates)), report.candidates)
    ax.set_yticks(range(report.layers), [str(i) for i in range(report.layers)], fontsize=7)
    ax.set_xlabel("type")
    ax.set_ylabel("layer")
    ax.set_title("KLD when only this layer is quantized (log10)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
