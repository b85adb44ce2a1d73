"""Depth pruning: remove whole decoder layers.

Every runtime speeds up by the fraction of layers removed, and the output is a standard
config with fewer layers whose tensors are renumbered 0..L-N-1: transformers, llama.cpp
and onnxruntime then see an ordinary smaller model (a gap in the numbering would make
transformers build missing layers and misnumber its KV cache, transformers #30508).

Which layers go:
- block-influence (ShortGPT, Men et al. 2024): a layer whose output points where its input
  did changes the residual stream least; drop the N layers with the lowest
  BI_i = 1 - mean cos(h_in_i, h_out_i). Layers are judged one at a time.
- angular-distance (Gromov et al. 2024): drop the contiguous block [l, l+N) whose input
  and output are closest in angle, mean arccos(cos(h_l, h_{l+N})) / pi. It judges the
  block as a whole, so it accounts for layers that undo each other.
- last: the last N layers, no calibration (a baseline for the other two).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from cllm.core.calib import CalibrationOptions
from cllm.core.prune.base import PRUNERS, PruneContext, PrunedModel
from cllm.core.prune.structured import (
    TORCH_DTYPES,
    calibration,
    count_params,
    out_dtype,
    output_config,
    require_float,
)
from cllm.errors import UsageError
from cllm.formats.arch import layers_for_config
from cllm.formats.safetensors_io import PlannedTensor

if TYPE_CHECKING:
    from cllm.formats.checkpoint import Checkpoint

METRICS = ("block-influence", "angular-distance", "last")


@dataclass
class DepthConfig(CalibrationOptions):
    """Remove `drop_layers` decoder layers chosen by `metric`."""

    drop_layers: int = 1
    metric: str = "block-influence"  # block-influence | angular-distance | last
    dequantize: bool = False  # accept a quantized input and write it back as floats

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check_model(self, ckpt: Checkpoint) -> None:
        """Refusals that need the model, run by the job pipeline before any work."""
        require_float(ckpt, self.dequantize)
        n_layers = int(ckpt.config[layers_for_config(ckpt.config).layers_key])
        if self.drop_layers >= n_layers:
            raise UsageError(
                f"--drop-layers {self.drop_layers} leaves no layer of the model's {n_layers}",
                f"Use at most --drop-layers {n_layers - 1}",
            )

    def needs_calibration(self) -> bool:
        return self.metric != "last"

    def validate(self) -> None:
        self.check_calibration()
        if self.metric not in METRICS:
            raise UsageError(
                f"--layer-metric {self.metric} is not a depth pruning metric",
                "Use block-influence, angular-distance or last",
            )
        if self.drop_layers < 1:
            raise UsageError(
                f"--drop-layers {self.drop_layers} removes no layer",
                "Give the number of layers to remove, e.g. --drop-layers 4",
            )


def choose_layers(metric: str, values: list[float], n: int) -> list[int]:
    """The dropped layers: the n lowest block influences (ties to the lower index), or the
    block starting at the lowest angular distance (the first such start on a tie)."""
    if metric == "block-influence":
        order = sorted(range(len(values)), key=lambda i: (values[i], i))
        return sorted(order[:n])
    start = min(range(len(values)), key=lambda i: (values[i], i))
    return list(range(start, start + n))


def _renamed(ckpt: Checkpoint, old: str, new: str) -> PlannedTensor:
    info = ckpt.tensor_infos()[old]
    dtype = out_dtype(info.dtype)

    def produce() -> torch.Tensor:
        return ckpt.get(old).to(TORCH_DTYPES[dtype]).contiguous()

    return PlannedTensor(new, info.shape, dtype, produce)


def keep_layers(ckpt: Checkpoint, kept: list[int]) -> tuple[dict[str, Any], list[PlannedTensor]]:
    """The config and tensors of a model made of `kept` decoder layers (in that order,
    renumbered from 0): what depth pruning writes and `cllm distill --init layers:` trains."""
    st = layers_for_config(ckpt.config)
    n_layers = int(ckpt.config[st.layers_key])
    new_index = {old: new for new, old in enumerate(kept)}
    plans = []
    for name in ckpt.tensor_infos():
        new_name = st.renumbered(name, new_index)
        if new_name is not None:
            plans.append(_renamed(ckpt, name, new_name))
    out = output_config(ckpt)
    out[st.layers_key] = len(kept)
    for key in st.per_layer_keys:
        value = out.get(key)
        if isinstance(value, list) and len(value) == n_layers:
            out[key] = [value[i] for i in kept]
    return out, plans


@PRUNERS.register("depth", DepthConfig)
def prune_depth(ckpt: Checkpoint, cfg: DepthConfig, ctx: PruneContext) -> PrunedModel:
    st = layers_for_config(ckpt.config)
    cfg.check_model(ckpt)
    n_layers = int(ckpt.config[st.layers_key])
    n = cfg.drop_layers
    report: dict[str, Any] = {"metric": cfg.metric, "drop_layers": n, "layers_before": n_layers}
    if cfg.metric == "last":
        dropped = list(range(n_layers - n, n_layers))
    else:
        from cllm.core.prune.importance import depth_scores

        calib = calibration(ckpt, cfg, ctx)
        scores = depth_scores(
            ckpt, calib.ids, cfg.metric, n, seed=cfg.seed, batch_size=cfg.batch_size,
            compute_dtype=cfg.compute_dtype, on_layer=ctx.on_layer,
        )  # fmt: skip
        if cfg.metric == "block-influence":
            assert scores.block_influence is not None
            values = scores.block_influence
            report["block_influence"] = values
        else:
            assert scores.angular_distance is not None
            values = scores.angular_distance
            report["angular_distance"] = values  # index l: the block [l, l + drop_layers)
        report["tokens_measured"] = scores.tokens
        report["calibration"] = calib.to_provenance()
        dropped = choose_layers(cfg.metric, values, n)

    kept = [i for i in range(n_layers) if i not in set(dropped)]
    out, plans = keep_layers(ckpt, kept)
    report.update(
        {
            "dropped_layers": dropped,
            "kept_layers": kept,
            "params_before": count_params([i.shape for i in ckpt.tensor_infos().values()]),
            "params_after": count_params([p.shape for p in plans]),
        }
    )
    return PrunedModel(out, plans, report)
