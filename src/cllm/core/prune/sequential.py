"""One pass of a decoder layer that prunes its Linears on the way (within-layer sequential).

Wanda and SparseGPT need each Linear's input statistics over the *whole* calibration set
before any batch may go through the pruned Linear. Done naively that is two passes per
layer: one for the statistics, one for the pruned layer's outputs, which is what most
implementations (and llm-compressor) run. Here every calibration batch runs the layer's
ordinary forward in its own thread; a pre-hook on each pruned Linear parks the batch there
until all batches have arrived, the Linear is pruned once from all their inputs (taken in
batch order, so the result does not depend on thread timing), and the batches go on through
the pruned weights. One pass in total, and each Linear's statistics come from inputs that
already went through the pruned Linears before it in the layer ("true sequential", as in
the GPTQ and SparseGPT reference code), which never needs architecture knowledge: the
layer's own forward decides the order.

Only one batch computes at a time (a baton passes between threads), so the CPU's threads
serve one matmul at a time, as in the two-pass loop. The cost is memory: while batches wait
at a Linear, every batch's activations of the layer are alive at once. `fits` decides from
sizes alone (never from the machine's free memory, so the same command gives the same model
everywhere) whether that stays under `BUDGET_BYTES`; above it the two-pass loop is used.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from cllm.core.quantize.layerwise import LayerRunner

BUDGET_BYTES = 6 << 30


def activation_bytes(config: dict[str, Any], tokens: int) -> int:
    """An upper estimate of one layer's live fp32 activations with every batch parked: the
    widest Linear input (the FFN's, about to enter down_proj) plus a few hidden-width
    tensors (residual, normed input, attention output) per token."""
    hidden = int(config.get("hidden_size") or 0)
    inter = int(config.get("intermediate_size") or 4 * hidden)
    return tokens * (inter + 5 * hidden) * 4


def fits(config: dict[str, Any], tokens: int) -> bool:
    return activation_bytes(config, tokens) <= BUDGET_BYTES


class _Abort(Exception):
    """A batch stops because another one failed."""


def prune_in_one_pass(
    runner: LayerRunner,
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    linears: dict[str, torch.nn.Linear],
    prune: Callable[[str, torch.nn.Linear, list[torch.Tensor]], None],
) -> torch.Tensor:
    """Run every calibration batch through `layer` once and return its outputs. Before any
    batch goes through a Linear of `linears`, `prune(name, module, inputs)` is called once
    with that Linear's input from every batch, in batch order, and must replace the
    module's weight in place."""
    batches = list(runner.batches(layer, hidden))
    n = len(batches)
    out = torch.empty_like(hidden)
    baton = threading.Lock()
    errors: list[BaseException] = []
    seen: dict[str, list[torch.Tensor | None]] = {name: [None] * n for name in linears}
    local = threading.local()

    def commit(name: str) -> Callable[[], None]:
        def action() -> None:
            inputs = [x for x in seen[name] if x is not None]
            try:  # new weights are ordinary tensors, usable after the pass
                with torch.inference_mode(False), torch.no_grad():
                    prune(name, linears[name], inputs)
            finally:
                seen[name] = [None] * n  # a Linear called twice waits again

        return action

    barriers = {name: threading.Barrier(n, action=commit(name)) for name in linears}

    def hook_for(name: str) -> Callable[..., None]:
        def hook(_mod: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            seen[name][local.index] = inputs[0]
            baton.release()
            try:
                barriers[name].wait()
            except threading.BrokenBarrierError:
                raise _Abort from None
            finally:
                baton.acquire()

        return hook

    def work(b: int, rows: slice, run: Callable[[], Any]) -> None:
        local.index = b
        with torch.inference_mode():  # thread-local, like autocast (set inside run())
            baton.acquire()
            try:
                y = run()
                out[rows] = y[0] if isinstance(y, tuple) else y
            except BaseException as exc:  # noqa: BLE001 - re-raised by the caller
                if not isinstance(exc, _Abort):
                    errors.append(exc)
                for barrier in barriers.values():
                    barrier.abort()
            finally:
                baton.release()

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in linears.items()]
    threads = [
        threading.Thread(target=work, args=(b, rows, run), daemon=True, name=f"cllm-batch-{b}")
        for b, (rows, run) in enumerate(batches)
    ]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    except BaseException:
        for barrier in barriers.values():
            barrier.abort()
        raise
    finally:
        for h in handles:
            h.remove()
    if errors:
        raise errors[0]
    return out
