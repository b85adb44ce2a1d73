"""Prune sensitivity: KLD when only one sublayer (attention or MLP) of one decoder layer is
pruned with the chosen method and sparsity, against the unpruned model, on calibration
text. The map shows where pruning hurts; `--profile FILE` turns it into per-layer
sparsities (`cllm.core.prune.profile`).

Each sublayer is pruned as the method would prune it with dense inputs: Wanda's column
norms and SparseGPT's Hessians come from the base model's own activations entering that
layer (a one-layer-at-a-time sensitivity, the usual approximation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from cllm.core.sensitivity import LayerProbe, kld_map, layer_linears
from cllm.formats.checkpoint import Checkpoint

SUBLAYERS = ("attention", "mlp")
_PREFIX = {"attention": "self_attn.", "mlp": "mlp."}


@dataclass
class PruneSensitivityReport:
    columns: list[str]
    layers: int
    kld: list[list[float]]  # [layer][column]
    layer_params: list[int]  # prunable weights per layer
    method: str
    sparsity: float
    pattern: str | None
    protocol: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _input_stats(
    probe: LayerProbe, layer: torch.nn.Module, linears: dict[str, torch.nn.Linear], hessian: bool
) -> dict[str, torch.Tensor]:
    """Per Linear: its inputs' per-column sum of squares (Wanda) or Gram matrix (SparseGPT)."""
    stats: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def grab(_m: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            if hessian:
                stats[name] = (2.0 / x.shape[0]) * (x.t() @ x)
            else:
                stats[name] = x.pow(2).sum(0)

        return grab

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        probe.run(layer)
    finally:
        for h in handles:
            h.remove()
    return stats


@torch.inference_mode()
def measure_prune_sensitivity(
    ckpt: Checkpoint,
    cfg: Any,
    chunks: list[np.ndarray],
    on_step: Callable[[int, int], None] | None = None,
) -> PruneSensitivityReport:
    from cllm.core.eval.backends import build_torch_model
    from cllm.core.prune.base import PRUNERS
    from cllm.core.prune.magnitude import magnitude_prune
    from cllm.core.prune.sparsegpt import sparsegpt_prune
    from cllm.core.prune.wanda import wanda_prune

    method = PRUNERS.name_of(cfg)
    nm = cfg.nm()
    sparsity = cfg.sparsity if nm is None else 1 - nm[0] / nm[1]
    model = build_torch_model(ckpt)
    n_layers = len(model.model.layers)
    params = [
        sum(m.weight.numel() for m in layer_linears(model, i).values()) for i in range(n_layers)
    ]

    def prune_sublayer(model: Any, i: int, column: str, probe: LayerProbe) -> Callable[[], None]:
        layer = model.model.layers[i]
        linears = {
            n: m for n, m in layer_linears(model, i).items() if n.startswith(_PREFIX[column])
        }
        originals = {n: m.weight.data for n, m in linears.items()}
        stats = (
            {}
            if method == "magnitude"
            else _input_stats(probe, layer, linears, method == "sparsegpt")
        )
        for n, m in linears.items():
            w = originals[n]
            if method == "magnitude":
                m.weight.data = magnitude_prune(w, sparsity, nm)
            elif method == "wanda":
                m.weight.data = wanda_prune(w, stats[n], sparsity, nm)
            else:
                m.weight.data = sparsegpt_prune(w, stats[n], sparsity, nm, damp=cfg.damp)

        def restore() -> None:
            for n, m in linears.items():
                m.weight.data = originals[n]

        return restore

    kld = kld_map(ckpt, chunks, list(SUBLAYERS), prune_sublayer, on_step, model=model)
    return PruneSensitivityReport(
        list(SUBLAYERS), n_layers, kld, params, method, sparsity, cfg.pattern
    )
