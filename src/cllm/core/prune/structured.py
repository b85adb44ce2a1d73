"""Width pruning: remove whole FFN channels, attention heads or hidden channels.

Unlike unstructured sparsity (zeros that llama.cpp and onnxruntime still multiply), this
makes every matrix smaller, so the output is a smaller standard model that every loader
runs faster: the same number of units goes in every layer, and the config keeps one
`intermediate_size`, `num_attention_heads`, `num_key_value_heads`, `hidden_size` and an
explicit `head_dim` (llama.cpp's `llama` architecture takes one width for all layers).

Units are ranked by activation importance on calibration text (`importance.py`, after
Minitron, Muralidharan et al. 2024) and the least important are cut in one shot, with no
retraining: distillation or fine-tuning afterwards is the user's next step, as in Minitron.

Which tensors hold which units is `ArchSpec.structure`'s knowledge (`cllm.formats.arch`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from cllm.core.calib import CalibrationOptions
from cllm.core.prune.base import PRUNERS, PruneContext, PrunedModel
from cllm.errors import UsageError
from cllm.formats.arch import UnitAxes, structure_for_config
from cllm.formats.safetensors_io import PlannedTensor

if TYPE_CHECKING:
    from cllm.core.calib import Calibration
    from cllm.formats.arch import Structure
    from cllm.formats.checkpoint import Checkpoint

TARGETS = ("mlp", "heads", "hidden")
FLOAT_STORAGE = ("F32", "F16", "BF16")
TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass
class StructuredConfig(CalibrationOptions):
    """Remove `ratio` of the units of one kind (`target`) from every layer."""

    target: str = "mlp"  # mlp (FFN channels) | heads (attention heads) | hidden (hidden channels)
    ratio: float = 0.25  # fraction of the target's units removed, in (0, 1)
    dequantize: bool = False  # accept a quantized input and write it back as floats

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check_model(self, ckpt: Checkpoint) -> None:
        """Model-dependent refusals (quantized input, a ratio the shape cannot take), run by
        the job pipeline before calibration is read or anything is written."""
        require_float(ckpt, self.dequantize)
        _removal(self, ckpt)

    def needs_calibration(self) -> bool:
        return True

    def validate(self) -> None:
        self.check_calibration()
        if self.target not in TARGETS:
            raise UsageError(
                f"--structured {self.target} is not a structured pruning target",
                "Use mlp, heads or hidden",
            )
        if not 0 < self.ratio < 1:
            raise UsageError(
                f"--ratio {self.ratio} is outside (0, 1)",
                "Give the fraction of units to remove, e.g. --ratio 0.25",
            )


# -- shared with depth pruning -----------------------------------------------------------


def require_float(ckpt: Checkpoint, dequantize: bool) -> None:
    """Refuse a quantized input unless asked: the output is written as floats, so pruning a
    4-bit model would silently make a larger file than the input, and its quality is that
    of the quantized weights, not of the original model."""
    quantized = sorted(
        {i.dtype for i in ckpt.tensor_infos().values() if i.dtype not in FLOAT_STORAGE}
    )
    if quantized and not dequantize:
        raise UsageError(
            f"{ckpt.display_name} is quantized ({', '.join(quantized)}); pruning writes float weights",
            "Prune the unquantized model and quantize afterwards, or add --dequantize",
        )


def out_dtype(stored: str) -> str:
    """Float tensors keep their storage type; dequantized ones become F32."""
    return stored if stored in FLOAT_STORAGE else "F32"


def output_config(ckpt: Checkpoint) -> dict[str, Any]:
    cfg = dict(ckpt.config)
    cfg.pop("quantization_config", None)  # the output holds plain float tensors
    return cfg


def calibration(ckpt: Checkpoint, cfg: CalibrationOptions, ctx: PruneContext) -> Calibration:
    if ctx.calibration is None:
        ctx.calibration = cfg.load_calibration(ckpt.tokenizer_dir())
    return ctx.calibration


def count_params(shapes: list[tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes)


def ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8': removed indices, short enough for a report."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


# -- how many units go ---------------------------------------------------------------------


def units_removed(units: int, ratio: float, what: str) -> int:
    """round(ratio x units) with halves rounded up (not Python's round-half-to-even, so the
    count does not depend on the parity of the neighbour); refused when that is no unit or
    every unit."""
    r = math.floor(ratio * units + 0.5)
    if r < 1:
        raise UsageError(
            f"--ratio {ratio:g} of {units} {what} rounds to removing none",
            f"Use --ratio {1 / units:.3g} or more",
        )
    if r >= units:
        raise UsageError(
            f"--ratio {ratio:g} of {units} {what} removes all of them",
            f"Use --ratio {(units - 1) / units:.3g} or less",
        )
    return r


def gqa_shape(
    heads: int, kv_heads: int, ratio: float, hidden: int | None = None
) -> tuple[int, int]:
    """(KV heads kept, query heads kept per KV group) for removing `ratio` of the heads.

    Grouped-query attention shares KV head g among query heads g*q .. g*q + q - 1
    (q = heads / kv_heads), so the pruned model must keep the same number q' of query
    heads in each of the g' KV groups it keeps: heads' = g' * q' for 1 <= g' <= kv_heads,
    1 <= q' <= q. The rule: round(ratio x heads) heads go (halves up), and the kept count
    must factor that way; among the ways it does, keep the most KV groups, i.e. take query
    heads from every group before taking whole groups: a whole group takes its keys and
    values with it, which every query head of the group read, while one query head is only
    one reader. E.g. 9 heads / 3 KV, ratio 0.33: 3 go, one query head from each group
    (6 heads, 3 KV heads); ratio 0.5: 5 go, leaving 4 = 2 groups of 2. A kept count that
    does not factor (9 / 3, ratio 0.25: 7 kept) is refused, naming the achievable ratios,
    rather than silently pruning another amount than asked. With `hidden` given, the kept
    count must also divide it (see `Structure.hidden_multiple_of_heads`).
    """
    if heads % kv_heads:
        raise UsageError(f"the model has {heads} heads, not a multiple of {kv_heads} KV heads")
    q = heads // kv_heads

    def shape(kept: int, check_hidden: bool = True) -> tuple[int, int] | None:
        if check_hidden and hidden is not None and hidden % kept:
            return None
        for g in range(kv_heads, 0, -1):
            if kept % g == 0 and kept // g <= q:
                return g, kept // g
        return None

    kept = heads - units_removed(heads, ratio, "attention heads")
    got = shape(kept)
    if got is not None:
        return got
    if shape(kept, check_hidden=False) is None:
        why = f"which {kv_heads} KV groups of {q} cannot share evenly"
    else:
        why = f"and transformers needs hidden_size {hidden} to be a multiple of the head count"
    options = [k for k in range(heads - 1, 0, -1) if shape(k) is not None]
    raise UsageError(
        f"--ratio {ratio:g} leaves {kept} of {heads} heads, {why}",
        "Achievable: "
        + ", ".join(
            f"--ratio {(heads - k) / heads:.3g} ({k} head{'s' * (k > 1)})" for k in options
        ),
    )


def hidden_kept(hidden: int, ratio: float, multiple: int) -> int:
    """The hidden size left after removing `ratio` of `hidden` channels.

    round(ratio x hidden) channels go (halves up), then the size left is rounded to the
    nearest multiple of `multiple` (the head count, when the loader needs hidden_size to be
    one of its multiples; 1 otherwise), ties to the larger size, i.e. removing less.
    """
    want = hidden - units_removed(hidden, ratio, "hidden channels")
    low = want // multiple * multiple
    kept = low if want - low < low + multiple - want else low + multiple
    if kept >= hidden:
        raise UsageError(
            f"--ratio {ratio:g} of {hidden} hidden channels rounds to removing none "
            f"(the hidden size must stay a multiple of {multiple}, the head count)",
            f"Use --ratio {multiple / hidden:.3g} or more",
        )
    if kept < multiple:
        raise UsageError(
            f"--ratio {ratio:g} of {hidden} hidden channels leaves fewer than {multiple}, "
            "the head count, which the hidden size must be a multiple of",
            f"Use --ratio {(hidden - multiple) / hidden:.3g} or less",
        )
    return kept


# -- what goes ---------------------------------------------------------------------------


def lowest(scores: torch.Tensor, n: int) -> list[int]:
    """Indices of the n lowest scores; ties go to the lower index (a stable sort), so the
    choice is deterministic."""
    order = torch.sort(scores.double(), stable=True).indices
    return sorted(int(i) for i in order[:n])


def keep_heads(
    scores: torch.Tensor, kv_heads: int, g_kept: int, q_kept: int
) -> tuple[list[int], list[int]]:
    """(kept query heads, kept KV heads) of one layer, both ascending.

    Whole groups go first, by the L2 norm of their heads' scores (the norm of the group's
    combined contribution were the heads orthogonal); then the lowest heads in each
    remaining group. Ascending order keeps each kept group's heads contiguous, which is
    what makes new head j use new KV head j // q_kept.
    """
    q = scores.numel() // kv_heads
    per_group = scores.double().reshape(kv_heads, q)
    drop_groups = set(lowest(per_group.pow(2).sum(1).sqrt(), kv_heads - g_kept))
    kv = [g for g in range(kv_heads) if g not in drop_groups]
    heads: list[int] = []
    for g in kv:
        gone = set(lowest(per_group[g], q - q_kept))
        heads.extend(g * q + k for k in range(q) if k not in gone)
    return heads, kv


def _rows(keep: list[int], size: int) -> torch.Tensor:
    """Indices along an axis of units `keep`, each `size` entries wide."""
    idx = torch.as_tensor(keep, dtype=torch.long)
    return (idx[:, None] * size + torch.arange(size)[None]).reshape(-1)


Selection = list[tuple[int, torch.Tensor]]  # (axis, kept indices along it)


def _plan(
    ckpt: Checkpoint,
    name: str,
    select: Selection,
    scale: float | None,
) -> PlannedTensor:
    info = ckpt.tensor_infos()[name]
    shape = list(info.shape)
    for axis, idx in select:
        shape[axis] = int(idx.numel())
    dtype = out_dtype(info.dtype)

    def produce() -> torch.Tensor:
        t = ckpt.get(name)
        for axis, idx in select:
            t = t.index_select(axis, idx)
        if scale is not None:
            t = t.float() * scale
        return t.to(TORCH_DTYPES[dtype]).contiguous()

    return PlannedTensor(name, tuple(shape), dtype, produce)


def _plan_all(
    ckpt: Checkpoint,
    st: Structure,
    block: Callable[[int, str], Selection],
    glob: Callable[[str], Selection],
    norm_scale: float | None,
) -> list[PlannedTensor]:
    plans = []
    for name in ckpt.tensor_infos():
        where = st.layer_of(name)
        if where is not None:
            select = block(*where)
            is_norm = st.norms.block_axis(where[1]) is not None
        else:
            select = glob(name)
            is_norm = st.norms.global_axis(name) is not None
        plans.append(_plan(ckpt, name, select, norm_scale if is_norm else None))
    return plans


def _along(axes: UnitAxes, suffix: str, keep: list[int], size: int) -> Selection:
    axis = axes.block_axis(suffix)
    return [] if axis is None else [(axis, _rows(keep, size))]


def _removal(cfg: StructuredConfig, ckpt: Checkpoint) -> tuple[int, int, int]:
    """(units removed per layer, KV groups kept, query heads kept per group): refuses a ratio
    the model's shape cannot take."""
    st = structure_for_config(ckpt.config)
    conf = ckpt.config
    hidden = int(conf[st.hidden_key])
    heads = int(conf[st.heads_key])
    kv_heads = int(conf.get(st.kv_heads_key) or heads)
    if cfg.target == "mlp":
        return units_removed(int(conf[st.ffn_key]), cfg.ratio, "FFN channels"), 0, 0
    if cfg.target == "heads":
        need = hidden if st.hidden_multiple_of_heads else None
        g_kept, q_kept = gqa_shape(heads, kv_heads, cfg.ratio, need)
        return 0, g_kept, q_kept
    multiple = heads if st.hidden_multiple_of_heads else 1
    return hidden - hidden_kept(hidden, cfg.ratio, multiple), 0, 0


@PRUNERS.register("structured", StructuredConfig)
def prune_structured(ckpt: Checkpoint, cfg: StructuredConfig, ctx: PruneContext) -> PrunedModel:
    st = structure_for_config(ckpt.config)
    cfg.check_model(ckpt)
    conf = ckpt.config
    hidden = int(conf[st.hidden_key])
    inter = int(conf[st.ffn_key])
    heads = int(conf[st.heads_key])
    kv_heads = int(conf.get(st.kv_heads_key) or heads)
    head_dim = int(conf.get(st.head_dim_key) or hidden // heads)
    r, g_kept, q_kept = _removal(cfg, ckpt)

    from cllm.core.prune.importance import width_importance

    calib = calibration(ckpt, cfg, ctx)
    imp = width_importance(
        ckpt, st, calib.ids, {cfg.target}, head_dim=head_dim, batch_size=cfg.batch_size,
        compute_dtype=cfg.compute_dtype, on_layer=ctx.on_layer,
    )  # fmt: skip

    out = output_config(ckpt)
    out[st.head_dim_key] = head_dim  # explicit: hidden_size / heads no longer gives it
    report: dict[str, Any] = {"target": cfg.target, "ratio": cfg.ratio}
    no_sel: Callable[[str], Selection] = lambda _name: []  # noqa: E731
    norm_scale: float | None = None

    if cfg.target == "mlp":
        keep = [sorted(set(range(inter)) - set(lowest(s, r))) for s in imp.ffn]  # per layer
        removed = [sorted(set(range(inter)) - set(k)) for k in keep]
        plans = _plan_all(
            ckpt, st, lambda i, sfx: _along(st.ffn_channels, sfx, keep[i], 1), no_sel, None
        )
        out[st.ffn_key] = inter - r
        report["removed"] = {"ffn_channels_per_layer": r, "of": inter}
        report["removed_indices"] = {str(i): ranges(x) for i, x in enumerate(removed)}
        gone_scores = [s[x] for s, x in zip(imp.ffn, removed, strict=True)]
        kept_scores = [s[k] for s, k in zip(imp.ffn, keep, strict=True)]
    elif cfg.target == "heads":
        picks = [keep_heads(s, kv_heads, g_kept, q_kept) for s in imp.heads]

        def block(i: int, sfx: str) -> Selection:
            q_keep, kv_keep = picks[i]
            return _along(st.query_heads, sfx, q_keep, head_dim) + _along(
                st.kv_heads, sfx, kv_keep, head_dim
            )

        plans = _plan_all(ckpt, st, block, no_sel, None)
        out[st.heads_key] = g_kept * q_kept
        out[st.kv_heads_key] = g_kept
        report["removed"] = {
            "heads_per_layer": heads - g_kept * q_kept,
            "kv_heads_per_layer": kv_heads - g_kept,
            "of": {"heads": heads, "kv_heads": kv_heads},
        }
        report["removed_indices"] = {
            str(i): {
                "heads": ranges(sorted(set(range(heads)) - set(q))),
                "kv_heads": ranges(sorted(set(range(kv_heads)) - set(kv))),
            }
            for i, (q, kv) in enumerate(picks)
        }
        gone_scores = [
            s[sorted(set(range(heads)) - set(q))]
            for s, (q, _) in zip(imp.heads, picks, strict=True)
        ]
        kept_scores = [s[q] for s, (q, _) in zip(imp.heads, picks, strict=True)]
    else:
        assert imp.hidden is not None
        keep_h = sorted(set(range(hidden)) - set(lowest(imp.hidden, r)))
        d_new = hidden - r
        # RMSNorm divides by sqrt(mean(x^2) + eps) over the channels it sees: with fewer
        # channels the same sum of squares is divided by d_new instead of d, so the
        # denominator grows by sqrt(d / d_new). Scaling the norm weights by that factor and
        # eps by d / d_new makes sqrt(S / d_new + eps') exactly sqrt(d / d_new) times the
        # old denominator, so removing channels that are zero everywhere changes nothing.
        norm_scale = math.sqrt(hidden / d_new)
        h_idx = _rows(keep_h, 1)

        def block_h(_i: int, sfx: str) -> Selection:
            axis = st.hidden_channels.block_axis(sfx)
            return [] if axis is None else [(axis, h_idx)]

        def glob_h(name: str) -> Selection:
            axis = st.hidden_channels.global_axis(name)
            return [] if axis is None else [(axis, h_idx)]

        plans = _plan_all(ckpt, st, block_h, glob_h, norm_scale)
        out[st.hidden_key] = d_new
        eps = conf.get(st.norm_eps_key)
        if eps is not None:
            out[st.norm_eps_key] = float(eps) * hidden / d_new
        report["removed"] = {"hidden_channels": r, "of": hidden}
        report["removed_indices"] = ranges(sorted(set(range(hidden)) - set(keep_h)))
        report["norm_scale"] = norm_scale
        gone_scores = [imp.hidden[sorted(set(range(hidden)) - set(keep_h))]]
        kept_scores = [imp.hidden[keep_h]]

    before = count_params([i.shape for i in ckpt.tensor_infos().values()])
    after = count_params([p.shape for p in plans])
    report.update(
        {
            "config": {
                k: out.get(k)
                for k in (
                    st.hidden_key,
                    st.ffn_key,
                    st.heads_key,
                    st.kv_heads_key,
                    st.head_dim_key,
                    st.layers_key,
                )
            },
            "params_before": before,
            "params_after": after,
            "importance": {
                "aggregation": "sqrt(sum over windows of (mean over positions)^2)",
                # per layer (one entry for hidden channels): the margin the cut left
                "highest_removed": [float(s.max()) for s in gone_scores],
                "lowest_kept": [float(s.min()) for s in kept_scores],
            },
            "calibration": calib.to_provenance(),
        }
    )
    return PrunedModel(out, plans, report)
