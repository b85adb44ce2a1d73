"""Activation statistics that decide what structured and depth pruning remove.

Everything here runs the original model one decoder layer at a time on the calibration
windows (`LayerRunner`): only one layer's weights and the calibration hidden states are
in memory, so the cost is the same as one calibrated quantization pass.

Width (Minitron, Muralidharan et al. 2024): a unit's importance is how strongly it is
used on calibration text, measured per token, averaged over each window's positions and
combined over windows by an L2 norm: score = sqrt(sum_b (mean_s m[b, s])^2). The mean
over positions makes a score independent of the window length; the L2 over windows lets
a unit that matters a lot on some texts outrank one that is faintly used on all. That
(batch = L2, sequence = mean) combination is the one Minitron's ablation of aggregations
reports working best.

Depth: ShortGPT's block influence (Men et al. 2024) and the angular distance between a
layer's input and the input N layers on (Gromov et al. 2024).
"""

from __future__ import annotations

import copy
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from cllm.formats.arch import Structure
    from cllm.formats.checkpoint import Checkpoint

KINDS = ("mlp", "heads", "hidden")
ANGULAR_MAX_TOKENS = 4096  # token positions kept per layer for the angular distance


class _Aggregate:
    """sqrt(sum over windows of (mean over positions of a per-token magnitude)^2), per unit."""

    def __init__(self, units: int) -> None:
        self.sumsq = torch.zeros(units, dtype=torch.float64)

    def add(self, per_window: torch.Tensor) -> None:  # [windows, units]
        self.sumsq += per_window.double().pow(2).sum(0)

    def result(self) -> torch.Tensor:
        return self.sumsq.sqrt()


@dataclass
class WidthImportance:
    """Per-layer scores of FFN channels and query heads, one score per hidden channel."""

    ffn: list[torch.Tensor] = field(default_factory=list)  # [intermediate] per layer
    heads: list[torch.Tensor] = field(default_factory=list)  # [num_attention_heads] per layer
    hidden: torch.Tensor | None = None  # [hidden_size]


def _runner(ckpt: Checkpoint, batch_size: int, compute_dtype: str) -> Any:
    from cllm.core.quantize.layerwise import LayerRunner, resolve_compute_dtype

    return LayerRunner(
        ckpt, batch_size=batch_size, compute_dtype=resolve_compute_dtype(compute_dtype)
    )


def _final_norm(runner: Any, ckpt: Checkpoint, st: Structure) -> torch.nn.Module:
    """The norm after the last layer, built from the skeleton's module and the checkpoint's
    weights (so its eps and arithmetic are the model's own)."""
    norm = copy.deepcopy(runner.skeleton.get_submodule(st.final_norm)).to_empty(device="cpu")
    state = {
        name[len(st.final_norm) + 1 :]: ckpt.get(name).float()
        for name in ckpt.tensor_infos()
        if name.startswith(st.final_norm + ".")
    }
    norm.load_state_dict(state, strict=True, assign=True)
    return norm.eval()


@torch.inference_mode()
def width_importance(
    ckpt: Checkpoint,
    st: Structure,
    ids: torch.Tensor,
    kinds: set[str],
    *,
    head_dim: int,
    batch_size: int = 8,
    compute_dtype: str = "auto",
    on_layer: Callable[[int, int], None] | None = None,
) -> WidthImportance:
    """Score the units of `kinds` ("mlp", "heads", "hidden") on the calibration windows `ids`.

    - FFN channel c: |a_c| * ||W_down[:, c]|| per token, a = act(gate) * up (the input of the
      down projection). That is exactly the size of what channel c adds to the layer's
      output, so removing the lowest-scored channels removes the least output on the
      calibration tokens; with down_proj columns of equal norm it ranks as Minitron's |a_c|.
    - Query head h: ||W_o[:, h] a_h|| per token, a_h the head's slice of the o_proj input.
      Minitron scores ||a_h||; the head's slice alone cannot see that o_proj may scale it
      to nothing, and a head whose queries are zero still outputs the running mean of its
      values (softmax of equal scores), so ||a_h|| > 0 for a head that adds nothing. The
      contribution through o_proj is zero exactly when removing the head changes nothing.
    - Hidden channel c: |y_c| per token for the output y of every RMSNorm (each layer's
      norms and the final one), the per-norm scores summed. These are the values every
      projection reads; a channel that is zero in the residual stream is zero in all of
      them, whatever the norm weights.
    """
    runner = _runner(ckpt, batch_size, compute_dtype)
    out = WidthImportance()
    d = int(runner.config.hidden_size)
    hidden_score = torch.zeros(d, dtype=torch.float64) if "hidden" in kinds else None
    hidden = runner.embed(ids)
    for i in range(runner.n_layers):
        layer = runner.build_layer(i)
        handles = []
        ffn_agg: _Aggregate | None = None
        head_agg: _Aggregate | None = None
        norm_aggs: list[_Aggregate] = []
        if "mlp" in kinds:
            down = layer.get_submodule(st.ffn_tap)
            ffn_agg = _Aggregate(down.in_features)
            col_norm = down.weight.float().norm(dim=0)

            def ffn_hook(
                _m: torch.nn.Module,
                inputs: tuple[torch.Tensor, ...],
                agg: _Aggregate = ffn_agg,
                scale: torch.Tensor = col_norm,
            ) -> None:
                agg.add(inputs[0].float().abs().mean(1) * scale)

            handles.append(down.register_forward_pre_hook(ffn_hook))
        if "heads" in kinds:
            o_proj = layer.get_submodule(st.head_tap)
            n_heads = o_proj.in_features // head_dim
            head_agg = _Aggregate(n_heads)
            w_heads = o_proj.weight.float().reshape(o_proj.out_features, n_heads, head_dim)

            def head_hook(
                _m: torch.nn.Module,
                inputs: tuple[torch.Tensor, ...],
                agg: _Aggregate = head_agg,
                w: torch.Tensor = w_heads,
            ) -> None:
                a = inputs[0].float()
                a = a.reshape(*a.shape[:-1], w.shape[1], w.shape[2])
                with torch.autocast("cpu", enabled=False):
                    per = [
                        (a[..., h, :] @ w[:, h, :].T).norm(dim=-1).mean(1)
                        for h in range(w.shape[1])
                    ]
                agg.add(torch.stack(per, dim=1))

            handles.append(o_proj.register_forward_pre_hook(head_hook))
        if hidden_score is not None:
            for tap in st.norm_taps:
                agg = _Aggregate(d)
                norm_aggs.append(agg)

                def norm_hook(
                    _m: torch.nn.Module,
                    _inputs: tuple[torch.Tensor, ...],
                    output: torch.Tensor,
                    agg: _Aggregate = agg,
                ) -> None:
                    agg.add(output.float().abs().mean(1))

                handles.append(layer.get_submodule(tap).register_forward_hook(norm_hook))
        try:
            hidden = runner.forward(layer, hidden)
        finally:
            for h in handles:
                h.remove()
            runner.release_layer(i)
        if ffn_agg is not None:
            out.ffn.append(ffn_agg.result().float())
        if head_agg is not None:
            out.heads.append(head_agg.result().float())
        if hidden_score is not None:
            for agg in norm_aggs:
                hidden_score += agg.result()
        if on_layer:
            on_layer(i, runner.n_layers)
    if hidden_score is not None:
        norm = _final_norm(runner, ckpt, st)
        final = _Aggregate(d)
        for b in range(0, hidden.shape[0], batch_size):
            final.add(norm(hidden[b : b + batch_size]).float().abs().mean(1))
        out.hidden = (hidden_score + final.result()).float()
    return out


# -- depth ------------------------------------------------------------------------------


def _unit_rows(h: torch.Tensor) -> torch.Tensor:
    """Each token's hidden state scaled to unit length, as fp16.

    Only directions matter for a cosine, and unit vectors fit fp16 whatever the model's
    activation outliers (raw hidden states can exceed fp16's range in some models).
    """
    x = h.reshape(-1, h.shape[-1]).float()
    return (x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)).half()


@dataclass
class DepthScores:
    block_influence: list[float] | None = None  # per layer: 1 - mean cos(in, out)
    angular_distance: list[float] | None = (
        None  # per block start l: mean arccos(cos(h_l, h_l+n))/pi
    )
    tokens: int = 0  # token positions each value averages over


@torch.inference_mode()
def depth_scores(
    ckpt: Checkpoint,
    ids: torch.Tensor,
    metric: str,
    span: int,
    *,
    seed: int = 0,
    batch_size: int = 8,
    compute_dtype: str = "auto",
    on_layer: Callable[[int, int], None] | None = None,
) -> DepthScores:
    """One pass over the layers of the original model on the calibration windows.

    block-influence: BI_i = 1 - mean over every calibration token of cos(h_in_i, h_out_i);
    exact, from the two hidden states the pass holds anyway.

    angular-distance: for each block start l, the mean over tokens of
    arccos(cos(h_l, h_{l+span})) / pi, h_l being layer l's input (h_L the last layer's
    output, before the final norm). Comparing states `span` layers apart would mean keeping
    span + 1 full hidden-state sets; instead a fixed, seeded subsample of at most
    ANGULAR_MAX_TOKENS token positions is kept per layer as fp16 unit vectors, in a ring of
    span + 1 entries: memory (span + 1) x 4096 x hidden x 2 bytes (about 50 MB for
    hidden 576, span 10), and the mean over 4096 tokens is well within the differences
    between blocks it has to separate.
    """
    runner = _runner(ckpt, batch_size, compute_dtype)
    n_layers = runner.n_layers
    hidden = runner.embed(ids)
    total = hidden.shape[0] * hidden.shape[1]
    out = DepthScores(tokens=total)
    pick: torch.Tensor | None = None
    ring: deque[torch.Tensor] = deque(maxlen=span + 1)
    if metric == "angular-distance":
        gen = torch.Generator().manual_seed(seed)
        k = min(total, ANGULAR_MAX_TOKENS)
        pick = torch.randperm(total, generator=gen)[:k].sort().values
        out.tokens = k
        out.angular_distance = []
        ring.append(_unit_rows(hidden.reshape(total, -1)[pick]))
    else:
        out.block_influence = []
    for i in range(n_layers):
        layer = runner.build_layer(i)
        try:
            nxt = runner.forward(layer, hidden)
        finally:
            runner.release_layer(i)
        if out.block_influence is not None:
            cos = torch.nn.functional.cosine_similarity(
                hidden.reshape(total, -1).float(), nxt.reshape(total, -1).float(), dim=-1
            )
            out.block_influence.append(float(1.0 - cos.double().mean()))
        if pick is not None and out.angular_distance is not None:
            ring.append(_unit_rows(nxt.reshape(total, -1)[pick]))
            if len(ring) == span + 1:  # ring[0] = h_{i+1-span}, ring[-1] = h_{i+1}
                cos = (ring[0].float() * ring[-1].float()).sum(-1).clamp(-1.0, 1.0)
                out.angular_distance.append(float((torch.arccos(cos) / math.pi).double().mean()))
        hidden = nxt
        if on_layer:
            on_layer(i, n_layers)
    return out
