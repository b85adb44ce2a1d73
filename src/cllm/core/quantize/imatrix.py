"""The importance matrix llama.cpp's quantizer weights its scale search with, from cllm's
calibration text: per Linear, the sum of x² of each input column and the token count.

It is the diagonal of the GPTQ Hessian (up to the factor 2/n), collected by the same
layer-by-layer pass over the calibration windows, in full precision: like llama.cpp's
`llama-imatrix`, each layer sees the unquantized outputs of the layers before it. Linears
reading one tensor (q/k/v, gate/up) share one accumulation, so it is computed once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cllm.errors import InputError, UsageError
from cllm.formats.checkpoint import Checkpoint
from cllm.formats.imatrix import Imatrix


class _Sums:
    def __init__(self, dim: int) -> None:
        self.sums = torch.zeros(dim, dtype=torch.float64)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        self.sums += x.double().square().sum(dim=0)
        self.tokens += int(x.shape[0])


def _layer_sums(
    runner: Any, layer: torch.nn.Module, hidden: torch.Tensor
) -> tuple[dict[str, _Sums], torch.Tensor]:
    """Run the calibration set through one layer, summing x² at each Linear's input; returns
    the sums and the layer's outputs (the next layer's inputs)."""
    from cllm.core.quantize.layerwise import linear_modules

    accs: dict[str, _Sums] = {}
    last: list[Any] = [None, None]  # the tensor read last and its accumulator

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_mod: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0]
            if last[0] is x:  # q/k/v and gate/up read one tensor: accumulate it once
                accs[name] = last[1]
                return
            acc = accs.setdefault(name, _Sums(x.shape[-1]))
            acc.add(x)
            last[0], last[1] = x, acc

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in linear_modules(layer).items()]
    try:
        out = runner.forward(layer, hidden)
    finally:
        for h in handles:
            h.remove()
    return accs, out


def collect_imatrix(
    ckpt: Checkpoint,
    calibration: Any,
    *,
    batch_size: int = 8,
    compute_dtype: str = "fp32",
    on_layer: Callable[[int, int], None] | None = None,
) -> Imatrix:
    """One pass of the calibration windows through the model, a layer at a time."""
    from cllm.core.quantize.layerwise import LayerRunner, resolve_compute_dtype

    runner = LayerRunner(
        ckpt, batch_size=batch_size, compute_dtype=resolve_compute_dtype(compute_dtype)
    )
    n_layers = runner.n_layers
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    hidden = runner.embed(calibration.ids)
    for i in range(n_layers):
        layer = runner.build_layer(i)
        accs, hidden = _layer_sums(runner, layer, hidden)
        prefix = runner.layer_prefix(i)
        for n, acc in accs.items():
            gguf = runner.spec.gguf_name(prefix + n + ".weight", n_layers)
            if gguf is None:
                continue
            sums[gguf] = acc.sums.float().numpy().reshape(1, -1)
            counts[gguf] = np.array([acc.tokens], dtype=np.float32)
        runner.release_layer(i)
        if on_layer:
            on_layer(i, n_layers)
    ids = calibration.ids
    return Imatrix(
        sums,
        counts,
        datasets=[Path(str(calibration.path)).name],
        chunk_count=int(ids.shape[0]),
        chunk_size=int(ids.shape[1]),
    )


def entries_for(im: Imatrix, shapes: dict[str, tuple[int, ...]], source: str) -> dict[str, Any]:
    """The entries llama.cpp will look up for the tensors of one GGUF file (name -> its
    GGUF shape, ne[0] first), checked before llama.cpp sees them: llama.cpp aborts on a size
    mismatch and silently skips a name it does not find."""
    matched = [n for n in im.names if n in shapes]
    if not matched:
        raise InputError(
            f"importance matrix {source} has no entry for any tensor of this model "
            f"(it names e.g. {im.names[0]})",
            "Use one computed for this model, or --imatrix auto",
        )
    for name in matched:
        want = shapes[name][0] * (shapes[name][2] if len(shapes[name]) > 2 else 1)
        have = im.mean(name).size
        if have != want:
            raise InputError(
                f"importance matrix {source}: {name} has {have} values, the tensor has {want} input columns",
                "It was computed for another model; use --imatrix auto",
            )
    return {
        "matched": len(matched),
        "missing": sorted(
            n for n in shapes if n.startswith("blk.") and n.endswith(".weight") and n not in im.sums
        ),
    }


def load_imatrix(path: str) -> Imatrix:
    from cllm.formats.imatrix import read_imatrix

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--imatrix {path}: no such file", "Give a file, or --imatrix auto")
    return read_imatrix(p)
