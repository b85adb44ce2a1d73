"""AWQ (Lin et al., 2023, "Activation-aware Weight Quantization"), layer by layer.

A few input channels of a Linear carry much larger activations than the rest, and
the weights they multiply matter most for the output. AWQ scales those weight
columns up by `s` before quantizing (so they lose less to rounding) and divides
the producer of the input by `s` (an RMSNorm weight, or the rows of the Linear
that writes the input), which leaves the full-precision layer unchanged.

For each group of Linears reading the same input, `s = mean|x| ** alpha`
(normalised as the reference does) with alpha searched on a grid in [0, 1);
alpha = 0 is s = 1, plain round to nearest, so the chosen scale is never worse
than RTN on the objective: the Linears' output error on the calibration tokens,
computed exactly over every token from their Gram matrix.

The scaled weights are then quantized by RTN or by GPTQ (`then`), on any `Grid`,
and the quantized layer's outputs feed the next layer, as in GPTQ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from cllm.core.calib import CalibrationOptions
from cllm.core.quantize.grid import Grid, GridPlan, dequantize_groups, grid_for, quantize_rtn
from cllm.core.quantize.registry import QUANTIZERS, QuantContext
from cllm.errors import RuntimeFailure, UsageError
from cllm.formats.arch import ArchSpec, AwqGroup

if TYPE_CHECKING:
    from cllm.core.calib import Calibration
    from cllm.core.quantize.gptq import HessianAccumulator
    from cllm.core.quantize.layerwise import LayerRunner
    from cllm.core.quantize.methods import QuantResult
    from cllm.core.quantize.store import LayerStateStore
    from cllm.formats.checkpoint import Checkpoint


@dataclass
class AWQConfig(CalibrationOptions):
    """AWQ scale search on calibration activations, then RTN or GPTQ on the scaled weights."""

    grid_points: int = 20  # alpha in {0, 1/n, ..., (n-1)/n}
    then: str = "rtn"  # rtn | gptq: what quantizes the scaled weights
    damp: float = 0.01  # then=gptq only
    act_order: bool = False  # then=gptq only
    method: str = field(default="awq", init=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        from cllm.core.quantize.methods import check_calibrated_options

        if self.then not in ("rtn", "gptq"):
            raise UsageError(f"--awq-then {self.then} is not supported", "Use rtn or gptq")
        if not 1 <= self.grid_points <= 1000:
            raise UsageError(
                f"--awq-grid {self.grid_points} is out of range", "Use 1 to 1000 (20 is usual)"
            )
        if self.act_order and self.then != "gptq":
            raise UsageError(
                "--act-order applies to GPTQ",
                "Add --awq-then gptq to quantize AWQ's weights with GPTQ",
            )
        self.check_calibration()
        check_calibrated_options(self.compute_dtype, self.damp)

    def needs_calibration(self) -> bool:
        return True


# -- the scale search ---------------------------------------------------------------


def awq_scales(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x| ** alpha, normalised so that max(s) * min(s) = 1 (the reference's choice)."""
    s = mean_abs.float().pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def output_error(delta: torch.Tensor, H: torch.Tensor) -> float:
    """Mean over tokens of ||x @ delta^T||^2, given H = 2/n sum x x^T (a HessianAccumulator's)."""
    return 0.5 * float(((delta @ H) * delta).sum(dtype=torch.float64))


def rtn_dequantized(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    codes, scales, zeros = quantize_rtn(w, grid)
    return dequantize_groups(codes, scales, zeros, grid.group_width(w.shape[1]))


@dataclass
class ScaleSearch:
    alpha: float
    scales: torch.Tensor  # [in_features]
    errors: list[float]  # output error at each grid point (errors[0]: alpha = 0, plain RTN)


def search_scale(
    weights: list[torch.Tensor],
    mean_abs: torch.Tensor,
    H: torch.Tensor,
    grid: Grid,
    grid_points: int = 20,
) -> ScaleSearch:
    """The alpha whose scales give the least output error of RTN(W * s) / s on inputs with Gram H.

    `weights` are the Linears reading one input (stacked: groups are per row, so this is
    the same as quantizing each one); ties keep the smaller alpha, so plain RTN wins them.
    """
    W = torch.cat([w.float() for w in weights], dim=0)
    H = H.float()
    errors: list[float] = []
    best = (float("inf"), 0.0)
    for k in range(grid_points):
        alpha = k / grid_points
        s = awq_scales(mean_abs, alpha)
        err = output_error(rtn_dequantized(W * s, grid) / s - W, H)
        errors.append(err)
        if err < best[0]:
            best = (err, alpha)
    alpha = best[1]
    return ScaleSearch(alpha, awq_scales(mean_abs, alpha), errors)


# -- a decoder layer's input groups ---------------------------------------------------


InputGroup = AwqGroup


def layer_groups(layer: torch.nn.Module, spec: ArchSpec) -> tuple[InputGroup, ...]:
    """The family's scale-folding groups (from its `ArchSpec`), checked against the layer
    actually built: a layer that does not have them is refused rather than mis-folded."""
    from cllm.core.quantize.layerwise import linear_modules

    mods = dict(layer.named_modules())
    linears = set(linear_modules(layer))
    groups = spec.awq_groups
    consumers = {c for g in groups for c in g.consumers}
    missing = [g.producer for g in groups if g.producer not in mods]
    if not groups or missing or not consumers <= linears:
        raise UsageError(
            f"AWQ does not know this decoder layer ({type(layer).__name__}) of {spec.label}",
            "Use --method gptq or rtn for this model",
        )
    return groups


@dataclass
class GroupStats:
    hessian: HessianAccumulator  # H = 2/n sum x x^T of the group's input
    abs_sum: torch.Tensor
    count: int = 0

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)


def collect_stats(
    runner: LayerRunner,
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    groups: tuple[InputGroup, ...],
) -> dict[str, GroupStats]:
    """One pass of the layer over the calibration set: each group's input Gram matrix and mean |x|."""
    from cllm.core.quantize.gptq import HessianAccumulator

    mods = dict(layer.named_modules())
    stats: dict[str, GroupStats] = {}
    handles = []

    def make_hook(st: GroupStats) -> Callable[..., None]:
        def hook(_mod: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            st.hessian.add(x)
            st.abs_sum += x.abs().sum(dim=0)
            st.count += x.shape[0]

        return hook

    for g in groups:
        first = mods[g.consumers[0]]
        assert isinstance(first, torch.nn.Linear)
        st = GroupStats(HessianAccumulator(first.in_features), torch.zeros(first.in_features))
        stats[g.producer] = st
        handles.append(first.register_forward_pre_hook(make_hook(st)))
    try:
        runner.forward(layer, hidden)
    finally:
        for h in handles:
            h.remove()
    return stats


def fold_scales(
    layer: torch.nn.Module, group: InputGroup, s: torch.Tensor, norm_offset: float = 0.0
) -> None:
    """Multiply the consumers' input columns by s and divide the producer's output by s."""
    mods = dict(layer.named_modules())
    for c in group.consumers:
        m = mods[c]
        assert isinstance(m, torch.nn.Linear)
        m.weight.data = m.weight.data * s[None, :]
    prod = mods[group.producer]
    if group.kind == "norm":
        # a norm computing x * (offset + w) (Gemma: offset 1) scales as a whole
        prod.weight.data = (prod.weight.data + norm_offset) / s - norm_offset
        bias = getattr(prod, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.data = bias.data / s
    else:
        assert isinstance(prod, torch.nn.Linear)
        prod.weight.data = prod.weight.data / s[:, None]
        if prod.bias is not None:
            prod.bias.data = prod.bias.data / s


def layer_output(runner: LayerRunner, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's output in fp32 (no autocast), for checking that folding kept its function."""
    with torch.inference_mode():
        y = layer(x, **runner.layer_kwargs(layer, x))
    return y[0] if isinstance(y, tuple) else y


@dataclass
class LayerOutcome:
    results: dict[str, QuantResult]
    dense: dict[str, torch.Tensor]  # tensors folding changed that are written unquantized
    alphas: dict[str, float]  # chosen alpha per group (by producer); absent: not scaled


def awq_layer(
    runner: LayerRunner,
    layer: torch.nn.Module,
    prefix: str,
    hidden: torch.Tensor,
    grid: Grid,
    wanted: set[str],
    cfg: AWQConfig,
) -> LayerOutcome:
    """Search, fold and quantize one decoder layer in place (its modules end up quantized)."""
    from cllm.core.quantize.gptq import gptq_quantize
    from cllm.core.quantize.methods import QuantResult
    from cllm.core.quantize.sparsity import MaskPolicy

    groups = layer_groups(layer, runner.spec)
    mods = dict(layer.named_modules())
    heads = int(runner.config.num_attention_heads)
    kv_heads = int(getattr(runner.config, "num_key_value_heads", None) or heads)
    stats = collect_stats(runner, layer, hidden, groups)
    original = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    probe = hidden[:1]
    before = layer_output(runner, layer, probe)

    scales: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for g in groups:
        selected = [c for c in g.consumers if prefix + c + ".weight" in wanted]
        if not selected or g.kind == "none":
            continue
        if g.kind == "rows":
            prod, cons = mods[g.producer], mods[g.consumers[0]]
            assert isinstance(prod, torch.nn.Linear) and isinstance(cons, torch.nn.Linear)
            if prod.out_features != cons.in_features or (
                g.producer.endswith("v_proj") and kv_heads != heads
            ):
                continue  # grouped-query attention: v's rows do not map 1:1 onto o's inputs
        weights = []
        for c in selected:
            m = mods[c]
            assert isinstance(m, torch.nn.Linear)
            weights.append(m.weight.data)
        st = stats[g.producer]
        found = search_scale(weights, st.mean_abs, st.hessian.H, grid, cfg.grid_points)
        alphas[g.producer] = found.alpha
        if found.alpha > 0:
            scales[g.producer] = found.scales
    # every search above saw the original weights (as the reference does); now fold them all
    for g in groups:
        if g.producer in scales:
            fold_scales(layer, g, scales[g.producer], runner.spec.norm_offset)
    after = layer_output(runner, layer, probe)
    drift = float((after - before).abs().max() / before.abs().max().clamp(min=1e-12))
    if drift > 1e-3:
        raise RuntimeFailure(
            f"AWQ: folding the scales changed the full-precision output of {prefix[:-1]} "
            f"(relative difference {drift:.2g})",
            "This layer type is not supported by AWQ; use --method gptq or rtn",
        )
    dense = {
        prefix + k: v.detach().clone()
        for k, v in layer.state_dict().items()
        if prefix + k not in wanted and not torch.equal(v, original[k])
    }

    # folding multiplies columns (divides rows) by s > 0, so a pruned input's zeros are still
    # where they were: GPTQ must hold them, RTN on a grid with an exact zero keeps them anyway
    masks = MaskPolicy(getattr(runner, "ckpt", None))
    results: dict[str, QuantResult] = {}
    for g in groups:
        s = scales.get(g.producer)
        for c in g.consumers:
            name = prefix + c + ".weight"
            if name not in wanted:
                continue
            m = mods[c]
            assert isinstance(m, torch.nn.Linear)
            group = grid.group_width(m.in_features)
            if cfg.then == "gptq":
                H = stats[g.producer].hessian.H
                if s is not None:  # the scaled layer's inputs are x / s
                    H = H / (s[:, None] * s[None, :])
                mask = masks.mask(name, m.weight.data)
                res = gptq_quantize(
                    m.weight.data, H, grid, act_order=cfg.act_order, damp=cfg.damp, mask=mask
                )
                results[name] = QuantResult(res.codes, res.scales, res.zeros, group)
                m.weight.data = res.weight
            else:
                codes, qs, qz = quantize_rtn(m.weight.data, grid)
                results[name] = QuantResult(codes, qs, qz, group)
                m.weight.data = dequantize_groups(codes, qs, qz, group)
    return LayerOutcome(results, dense, alphas)


def run_awq(
    ckpt: Checkpoint,
    grid: GridPlan,
    names: list[str],
    cfg: AWQConfig,
    calib: Calibration,
    store: LayerStateStore,
    resume: bool = False,
    on_layer: Callable[[int, int], None] | None = None,
) -> LayerStateStore:
    """Quantize every selected Linear with AWQ; each layer sees inputs from the quantized layers before it.

    The store receives each layer's quantized Linears and the unquantized tensors folding
    changed (norm weights, and v_proj / up_proj rows when those are left out with --keep).
    """
    from cllm.core.quantize.layerwise import drive_layers

    wanted = set(names)

    def work(
        runner: Any, i: int, layer: torch.nn.Module, hidden: torch.Tensor
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        outcome = awq_layer(
            runner, layer, runner.layer_prefix(i), hidden, grid_for(grid, i), wanted, cfg
        )
        return outcome.results, outcome.dense

    return drive_layers(
        ckpt, calib.ids, store, work, batch_size=cfg.batch_size, compute_dtype=cfg.compute_dtype,
        resume=resume, on_layer=on_layer,
    )  # fmt: skip


@QUANTIZERS.register("awq", AWQConfig)
def awq_store(
    ckpt: Checkpoint, grid: GridPlan, names: list[str], cfg: AWQConfig, ctx: QuantContext
) -> LayerStateStore:
    from cllm.core.quantize.store import LayerStateStore

    assert ctx.state_dir is not None
    store = LayerStateStore(ctx.state_dir, ctx.job_id, names, ctx.provenance)
    return run_awq(ckpt, grid, names, cfg, ctx.calibration, store, ctx.resume, ctx.on_layer)
