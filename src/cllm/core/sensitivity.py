"""Per-layer sensitivity maps: the KL divergence of a model's output when only one part of
one decoder layer is changed (quantized to a type, pruned at a sparsity, ...).

Quantize's mixed precision and prune's `--profile FILE` both read these maps, and both
measure them the same way: hidden states entering every layer are cached from one base
pass over calibration chunks, so each measurement only re-runs the layers from i onwards,
and KLD is taken over the second half of each chunk as in `cllm eval`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch

from cllm.formats.checkpoint import Checkpoint


class LayerProbe:
    """What a perturbation may look at: the hidden states entering layer i (from the base
    pass) and a way to run a layer on them, e.g. to gather its Linears' input statistics."""

    def __init__(self, inputs: torch.Tensor, run: Callable[[torch.nn.Module], torch.Tensor]):
        self.inputs = inputs
        self.run = run


# perturb(model, layer index, column, probe) -> restore: changes the layer in place, returns
# an undo
Perturb = Callable[[Any, int, str, LayerProbe], Callable[[], None]]


def layer_linears(model: Any, i: int) -> dict[str, torch.nn.Linear]:
    layer = model.model.layers[i]
    return {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


@torch.inference_mode()
def kld_map(
    ckpt: Checkpoint,
    chunks: list[np.ndarray],
    columns: list[str],
    perturb: Perturb,
    on_step: Callable[[int, int], None] | None = None,
    model: Any = None,
) -> list[list[float]]:
    """kld[layer][column]: mean KLD (base || perturbed) over the scored positions."""
    from cllm.core.eval.backends import build_torch_model
    from cllm.core.layer_call import head_logits

    model = model if model is not None else build_torch_model(ckpt)
    layers = model.model.layers
    n_layers = len(layers)
    ctx = len(chunks[0])
    first = ctx // 2
    ids = torch.as_tensor(np.stack(chunks)).long()
    captured: list[torch.Tensor] = []
    # what the model passed each layer besides its input (RoPE, masks per attention type),
    # so re-running a layer alone computes what the model would
    layer_kwargs: list[dict[str, Any]] = []

    def grab(_m: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append((args[0] if args else kwargs["hidden_states"]).detach().clone())
        layer_kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})

    handles = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in layers]
    try:
        base_logits = model(input_ids=ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    base_lp = torch.log_softmax(base_logits[:, first : ctx - 1].float(), dim=-1)
    base_p = base_lp.exp()

    def run_layer(layer: torch.nn.Module, x: torch.Tensor, i: int) -> torch.Tensor:
        y = layer(x, **layer_kwargs[i])
        return y[0] if isinstance(y, tuple) else y

    def tail_kld(i: int) -> float:
        x = captured[i]
        for k in range(i, n_layers):
            x = run_layer(layers[k], x, k)
        logits = head_logits(model, x)
        lp = torch.log_softmax(logits[:, first : ctx - 1].float(), dim=-1)
        return float((base_p * (base_lp - lp)).sum(-1).mean())

    kld = [[0.0] * len(columns) for _ in range(n_layers)]
    total = n_layers * len(columns)
    step = 0
    for i in range(n_layers):
        for j, column in enumerate(columns):
            probe = LayerProbe(captured[i], partial(run_layer, x=captured[i], i=i))
            restore = perturb(model, i, column, probe)
            try:
                kld[i][j] = tail_kld(i)
            finally:
                restore()
            step += 1
            if on_step:
                on_step(step, total)
    return kld
