"""GPTQ over a whole model, one decoder layer at a time, resumable."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from cllm.core.calib import Calibration
from cllm.core.quantize.gptq import HessianAccumulator, gptq_quantize
from cllm.core.quantize.grid import GridPlan, grid_for
from cllm.core.quantize.layerwise import LayerRunner, drive_layers, linear_modules
from cllm.core.quantize.methods import GPTQConfig, QuantResult
from cllm.core.quantize.registry import QUANTIZERS, QuantContext
from cllm.core.quantize.sparsity import MaskPolicy
from cllm.core.quantize.store import LayerStateStore
from cllm.formats.checkpoint import Checkpoint


class _AllInputsSeen(Exception):
    """Raised from a hook to end a batch's forward once every Linear has seen its input."""


def collect_hessians(
    runner: LayerRunner,
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    linears: dict[str, torch.nn.Linear],
) -> dict[str, HessianAccumulator]:
    """One pass of the layer over the calibration set, accumulating each Linear's input Hessian.

    Each batch stops as soon as every Linear has seen its input: the rest of the layer (at
    least the last projection) would only compute outputs nobody reads.
    """
    accs = {n: HessianAccumulator(m.in_features) for n, m in linears.items()}
    last: list[Any] = [
        None,
        None,
    ]  # (input tensor, its accumulator); holding it keeps its identity unique
    seen: set[str] = set()

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_mod: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0]
            if last[0] is x:  # q/k/v (and gate/up) read the same tensor: accumulate it once
                accs[name] = last[1]
            else:
                accs[name].add(x)
                last[0], last[1] = x, accs[name]
            seen.add(name)
            if len(seen) == len(accs):
                seen.clear()
                raise _AllInputsSeen

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in linears.items()]
    try:
        runner.feed(layer, hidden, stop=_AllInputsSeen)
    finally:
        for h in handles:
            h.remove()
    last[0] = last[1] = None
    return accs


def run_gptq(
    ckpt: Checkpoint,
    grid: GridPlan,
    names: list[str],
    cfg: GPTQConfig,
    calib: Calibration,
    store: LayerStateStore,
    resume: bool = False,
    on_layer: Callable[[int, int], None] | None = None,
) -> LayerStateStore:
    """Quantize every selected Linear; each layer sees inputs from the quantized layers before it."""
    wanted = set(names)
    # a pruned input's zeros stay exactly zero and the kept weights absorb the error
    # (SparseGPT's joint mode); without the mask, error feedback moves ~10% of them off zero
    masks = MaskPolicy(ckpt)

    def work(
        runner: LayerRunner, i: int, layer: torch.nn.Module, hidden: torch.Tensor
    ) -> tuple[dict[str, Any], None]:
        prefix = runner.layer_prefix(i)
        linears = {
            n: m for n, m in linear_modules(layer).items() if prefix + n + ".weight" in wanted
        }
        accs = collect_hessians(runner, layer, hidden, linears)
        results: dict[str, Any] = {}
        for n, m in linears.items():
            layer_grid = grid_for(grid, i, prefix + n + ".weight")
            res = gptq_quantize(
                m.weight.data,
                accs[n].H,
                layer_grid,
                act_order=cfg.act_order,
                damp=cfg.damp,
                blocksize=cfg.blocksize,
                clip=cfg.clip,
                mask=masks.mask(prefix + n + ".weight", m.weight.data),
            )
            m.weight.data = res.weight
            group = layer_grid.group_width(m.in_features)
            results[prefix + n + ".weight"] = QuantResult(
                res.codes, res.scales, res.zeros, group, res.raw
            )
        return results, None

    return drive_layers(
        ckpt, calib.ids, store, work, batch_size=cfg.batch_size, compute_dtype=cfg.compute_dtype,
        resume=resume, on_layer=on_layer,
    )  # fmt: skip


@QUANTIZERS.register("gptq", GPTQConfig)
def gptq_store(
    ckpt: Checkpoint, grid: GridPlan, names: list[str], cfg: GPTQConfig, ctx: QuantContext
) -> LayerStateStore:
    assert ctx.state_dir is not None
    store = LayerStateStore(ctx.state_dir, ctx.job_id, names, ctx.provenance)
    return run_gptq(ckpt, grid, names, cfg, ctx.calibration, store, ctx.resume, ctx.on_layer)
