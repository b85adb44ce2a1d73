"""What the unstructured methods share: which weights they prune, at what sparsity per layer,
the layer-by-layer driver Wanda and SparseGPT run under, and the `PrunedModel` they return.

Wanda and SparseGPT prune one decoder layer at a time, each layer seeing the calibration
activations produced by the already-pruned layers before it (the error of earlier layers is
then part of what later layers adapt to). Pruned weights go to a `LayerStateStore` (no
quantized tensors, only dense replacements), which is also what `--resume` restarts from;
the writer reads them back one tensor at a time.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cllm.core.prune.base import PruneContext, PrunedModel, keep_patterns, parse_layers
from cllm.core.prune.masks import check_nm, pruned_per_row
from cllm.errors import RuntimeFailure, UsageError

if TYPE_CHECKING:
    from cllm.core.calib import Calibration
    from cllm.core.prune.base import UnstructuredScope
    from cllm.core.quantize.layerwise import LayerRunner
    from cllm.core.quantize.store import LayerStateStore
    from cllm.formats.checkpoint import Checkpoint

_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.")


@dataclass
class Scope:
    """The decoder-layer linear weights a run prunes, grouped by layer."""

    n_layers: int
    names: list[str]  # in checkpoint order
    by_layer: dict[int, list[str]]  # only layers with at least one pruned tensor
    shapes: dict[str, tuple[int, int]]

    def layer_params(self, i: int) -> int:
        return sum(self.shapes[n][0] * self.shapes[n][1] for n in self.by_layer[i])


def layer_index(name: str) -> int:
    m = _LAYER_RE.match(name)
    if m is None:
        raise ValueError(f"{name} is not a decoder-layer tensor")
    return int(m.group(1))


def select_scope(ckpt: Checkpoint, cfg: UnstructuredScope) -> Scope:
    """Decoder-layer linear weights in `--layers`, minus `--keep` matches, checked against the
    pattern; embeddings, lm_head and norms are never candidates (their rows are not neurons
    whose inputs can be thinned, and they are a small share of the weights)."""
    from cllm.core.quantize.methods import LINEAR_RE

    n_layers = int(ckpt.config.get("num_hidden_layers") or 0)
    if n_layers < 1:
        raise UsageError(
            f"{ckpt.display_name}: config has no num_hidden_layers",
            "Only decoder models can be pruned",
        )
    wanted = set(parse_layers(cfg.layers, n_layers)) if cfg.layers else set(range(n_layers))
    pats = keep_patterns(cfg.keep)
    names: list[str] = []
    by_layer: dict[int, list[str]] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for name, info in ckpt.tensor_infos().items():
        if not LINEAR_RE.search(name) or len(info.shape) != 2:
            continue
        i = layer_index(name)
        if i not in wanted or any(p.search(name) for p in pats):
            continue
        names.append(name)
        by_layer.setdefault(i, []).append(name)
        shapes[name] = (int(info.shape[0]), int(info.shape[1]))
    if not names:
        raise UsageError(
            "no decoder-layer linear weights are left to prune", "Check --layers and --keep"
        )
    nm = cfg.nm()
    if nm:
        for name in names:
            check_nm(shapes[name][1], *nm, what=f"tensor {name}")
    return Scope(n_layers, names, by_layer, shapes)


def calibration_of(ckpt: Checkpoint, cfg: UnstructuredScope, ctx: PruneContext) -> Calibration:
    """The pipeline's calibration, or the config's own for callers that run a handler directly."""
    if ctx.calibration is None:
        ctx.calibration = cfg.load_calibration(ckpt.tokenizer_dir())
    return ctx.calibration


def layer_sparsities(
    ckpt: Checkpoint,
    cfg: UnstructuredScope,
    ctx: PruneContext,
    scope: Scope,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[int, float], dict[str, Any]]:
    """Each pruned layer's target sparsity under `--profile`, and what the report should add
    about how it was chosen (OWL's outlier ratios)."""
    nm = cfg.nm()
    layers = sorted(scope.by_layer)
    if nm:
        return {i: 1 - nm[0] / nm[1] for i in layers}, {}
    if cfg.profile == "file":
        given = ctx.layer_sparsity
        if given is None:
            raise UsageError("--profile file needs per-layer sparsities", "Pass a sensitivity JSON")
        if len(given) != scope.n_layers:
            raise UsageError(
                f"the sparsity profile has {len(given)} layers, but the model has {scope.n_layers}",
                "Use a profile measured on this model",
            )
        for i, s in enumerate(given):
            if not 0 <= s < 1:
                raise UsageError(
                    f"the sparsity profile gives layer {i} a sparsity of {s}, outside [0, 1)"
                )
        return {i: float(given[i]) for i in layers}, {}
    if cfg.profile == "owl":
        from cllm.core.prune.owl import measure_outlier_ratios, owl_sparsities

        ratios = measure_outlier_ratios(
            ckpt, cfg, calibration_of(ckpt, cfg, ctx), scope, progress=progress
        )
        sp = owl_sparsities(
            [ratios[i] for i in layers],
            cfg.sparsity,
            cfg.owl_lambda,
            weights=[scope.layer_params(i) for i in layers],
        )
        return dict(zip(layers, sp, strict=True)), {
            "owl_outlier_ratios": {str(i): ratios[i] for i in layers}
        }
    return {i: cfg.sparsity for i in layers}, {}


class _InputsSeen(Exception):
    """Raised from a hook to end a batch's forward once every Linear has seen its input."""


def column_sumsq(x: torch.Tensor) -> torch.Tensor:
    """One batch's per-input-column sum of squares: summed in fp32 (a vectorised reduction;
    einsum's "ij,ij->j" is 18x slower here), returned as float64 for accumulating batches."""
    flat = x.reshape(-1, x.shape[-1]).float()
    return (flat * flat).sum(0).double()


class _SumsqHooks:
    """Forward pre-hooks adding each Linear's per-input-column sum of squares (float64).

    q/k/v (and gate/up) read the same tensor and share one sum. With `stop`, a batch ends
    as soon as every Linear has seen its input (the rest of the layer is not needed).
    """

    def __init__(self, linears: dict[str, torch.nn.Linear], stop: bool) -> None:
        self.sums = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in linears.items()}
        self._last: list[Any] = [None, None]  # (input, its sum); holding it keeps its id unique
        self._seen: set[str] = set()
        self._stop = stop
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in linears.items()]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(_mod: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0]
            if self._last[0] is x:
                self.sums[name] = self._last[1]
            else:
                self.sums[name] += column_sumsq(x)
                self._last[0], self._last[1] = x, self.sums[name]
            self._seen.add(name)
            if self._stop and len(self._seen) == len(self.sums):
                self._seen.clear()
                raise _InputsSeen

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._last[0] = self._last[1] = None


def collect_input_sumsq(
    runner: LayerRunner,
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    linears: dict[str, torch.nn.Linear],
) -> dict[str, torch.Tensor]:
    """Each Linear's per-input-column sum of squares over every calibration token (float64).

    This is all Wanda needs (||X_j||^2), a vector instead of GPTQ's [cols, cols] Hessian, so
    the pass costs no more than the forward itself.
    """
    hooks = _SumsqHooks(linears, stop=True)
    try:
        runner.feed(layer, hidden, stop=_InputsSeen)
    finally:
        hooks.remove()
    return hooks.sums


def layer_linears(
    runner: LayerRunner, i: int, layer: torch.nn.Module, scope: Scope
) -> dict[str, torch.nn.Linear]:
    """The layer's modules whose weights the scope prunes, by name relative to the layer."""
    from cllm.core.quantize.layerwise import linear_modules

    prefix = runner.layer_prefix(i)
    wanted = set(scope.by_layer.get(i, ()))
    return {n: m for n, m in linear_modules(layer).items() if prefix + n + ".weight" in wanted}


class _PastLastLayer(Exception):
    """Raised by the work function once no later layer is pruned: their forwards are wasted."""


LayerStats = Callable[[int, dict[str, torch.nn.Linear], dict[str, torch.Tensor]], None]


def measure_dense_inputs(
    ckpt: Checkpoint,
    cfg: UnstructuredScope,
    calib: Calibration,
    scope: Scope,
    measure: LayerStats,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Run the dense model layer by layer and call `measure(i, linears, input_sumsq)` for each
    layer with pruned tensors. Nothing is pruned, so the forward that makes the next layer's
    inputs also sees this layer's: one pass per layer, not GPTQ's feed-then-forward; the
    pass ends at the last pruned layer."""
    from cllm.core.quantize.layerwise import LayerRunner, resolve_compute_dtype

    runner = LayerRunner(
        ckpt, batch_size=cfg.batch_size, compute_dtype=resolve_compute_dtype(cfg.compute_dtype)
    )
    last = max(scope.by_layer)
    hidden = runner.embed(calib.ids)
    for i in range(last + 1):
        layer = runner.build_layer(i)
        linears = layer_linears(runner, i, layer, scope)
        if i == last:
            measure(i, linears, collect_input_sumsq(runner, layer, hidden, linears))
        else:
            hooks = _SumsqHooks(linears, stop=False)
            try:
                hidden = runner.forward(layer, hidden)
            finally:
                hooks.remove()
            if linears:
                measure(i, linears, hooks.sums)
        runner.release_layer(i)
        if progress:
            progress(i, runner.n_layers)
    _report_rest(last, runner.n_layers, progress)


# (pruned weights by relative name, the pruned layer's outputs if the method computed them)
LayerPrune = Callable[
    ["LayerRunner", int, torch.nn.Module, torch.Tensor, dict[str, torch.nn.Linear], float],
    tuple[dict[str, torch.Tensor], torch.Tensor | None],
]


def state_store(ctx: PruneContext) -> tuple[LayerStateStore, Callable[[], None]]:
    """The layer store in `ctx.state_dir` (or a temporary folder for callers that give none)
    and how to remove it once the output is written."""
    from cllm.core.quantize.store import LayerStateStore

    if ctx.state_dir is not None:
        store = LayerStateStore(Path(ctx.state_dir), ctx.job_id, [], ctx.provenance)
        return store, store.cleanup
    tmp = Path(tempfile.mkdtemp(prefix="cllm-prune-"))
    store = LayerStateStore(tmp / "state", ctx.job_id, [], ctx.provenance)
    return store, lambda: shutil.rmtree(tmp, ignore_errors=True)


def run_layerwise(
    ckpt: Checkpoint,
    cfg: UnstructuredScope,
    ctx: PruneContext,
    scope: Scope,
    targets: dict[int, float],
    prune_layer: LayerPrune,
) -> tuple[LayerStateStore, Callable[[], None]]:
    """Prune layer by layer into the store; `prune_layer(runner, i, layer, hidden, linears,
    sparsity)` returns the pruned weights by relative name (and the layer's outputs when it
    ran the pruned layer itself). Returns the store and how to remove it once the output is
    written."""
    from cllm.core.quantize.layerwise import drive_layers

    calib = calibration_of(ckpt, cfg, ctx)
    store, cleanup = state_store(ctx)
    last = max(scope.by_layer, default=-1)
    computed: list[torch.Tensor] = []

    def work(
        runner: LayerRunner, i: int, layer: torch.nn.Module, hidden: torch.Tensor
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
        if i > last:
            raise _PastLastLayer
        linears = layer_linears(runner, i, layer, scope)
        if not linears:
            return {}, None
        pruned, outputs = prune_layer(runner, i, layer, hidden, linears, targets[i])
        if outputs is not None:
            computed.append(outputs)
        prefix = runner.layer_prefix(i)
        dense = {}
        for n, w in pruned.items():
            linears[n].weight.data = w.to(linears[n].weight.dtype)
            dense[prefix + n + ".weight"] = w
        return {}, dense

    try:
        drive_layers(
            ckpt, calib.ids, store, work, batch_size=cfg.batch_size,
            compute_dtype=cfg.compute_dtype, resume=ctx.resume, on_layer=ctx.on_layer,
            outputs=lambda: computed.pop() if computed else None,
        )  # fmt: skip
    except _PastLastLayer:
        _report_rest(last, scope.n_layers, ctx.on_layer)
    except BaseException:
        if ctx.state_dir is None:  # nothing could resume from a temporary folder
            cleanup()
        raise
    return store, cleanup


def _report_rest(last: int, n_layers: int, progress: Callable[[int, int], None] | None) -> None:
    """Layers after the last pruned one are copied unchanged: report them done."""
    if progress:
        for j in range(last + 1, n_layers):
            progress(j, n_layers)


def pruned_model(
    ckpt: Checkpoint,
    scope: Scope,
    produce: Callable[[str], torch.Tensor],
    report: dict[str, Any],
    cleanup: Callable[[], None] | None = None,
) -> PrunedModel:
    """Every tensor of the input, the pruned ones from `produce(name)` when the writer asks
    (in the tensor's planned dtype), the rest read from the checkpoint as they are."""
    from cllm.formats.safetensors_io import PlannedTensor
    from cllm.formats.save import FLOAT_DTYPES, plan_tensors

    selected = set(scope.names)
    plans = []
    for p in plan_tensors(ckpt, None):
        if p.name not in selected:
            plans.append(p)
            continue

        def make(name: str = p.name, dtype: str = p.dtype) -> torch.Tensor:
            return produce(name).to(getattr(torch, FLOAT_DTYPES[dtype]))

        plans.append(PlannedTensor(p.name, p.shape, p.dtype, make))
    config = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
    return PrunedModel(config, plans, report, cleanup)


def build_report(
    method: str,
    cfg: UnstructuredScope,
    scope: Scope,
    targets: dict[int, float],
    zeros: dict[str, int],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Overall and per-layer sparsity over the pruned tensors (zeros / weights), the targets,
    and which tensors were pruned."""
    nm = cfg.nm()
    layers = []
    total_zero = total = 0
    for i in sorted(scope.by_layer):
        names = scope.by_layer[i]
        z = sum(zeros[n] for n in names)
        p = scope.layer_params(i)
        layers.append(
            {
                "layer": i,
                "target": targets[i],
                "achieved": z / p,
                "tensors": len(names),
                "params": p,
            }
        )
        total_zero += z
        total += p
    report: dict[str, Any] = {
        "method": method,
        "pattern": cfg.pattern,
        "profile": cfg.profile,
        "target_sparsity": 1 - nm[0] / nm[1] if nm else cfg.sparsity,
        "achieved_sparsity": total_zero / total if total else 0.0,
        "pruned_params": total,
        "zeroed_params": total_zero,
        "pruned_tensor_count": len(scope.names),
        "pruned_tensors": list(scope.names),
        "layers": layers,
    }
    report.update(extra or {})
    return report


def expected_zeros(
    scope: Scope, targets: dict[int, float], cfg: UnstructuredScope
) -> dict[str, int]:
    """What the masks remove from each tensor, known from shapes alone (the count per row is
    exact by construction), for methods that stream and never hold the pruned output."""
    nm = cfg.nm()
    out = {}
    for i, names in scope.by_layer.items():
        for n in names:
            rows, cols = scope.shapes[n]
            per_row = cols // nm[1] * (nm[1] - nm[0]) if nm else pruned_per_row(cols, targets[i])
            out[n] = rows * per_row
    return out


def layerwise_result(
    method: str,
    ckpt: Checkpoint,
    cfg: UnstructuredScope,
    ctx: PruneContext,
    scope: Scope,
    targets: dict[int, float],
    prune_layer: LayerPrune,
    extra: dict[str, Any] | None = None,
) -> PrunedModel:
    """Run a layer-by-layer method and wrap its store as the handler's result; the report
    counts the zeros actually stored, so a resumed run reports what it will write."""
    store, cleanup = run_layerwise(ckpt, cfg, ctx, scope, targets, prune_layer)
    zeros = {}
    for name in scope.names:
        w = store.get_dense(name)
        if w is None:
            raise RuntimeFailure(
                f"{method}: {name} was selected but the layer has no such Linear module",
                "--keep that tensor",
            )
        zeros[name] = int((w == 0).sum())

    def produce(name: str) -> torch.Tensor:
        w = store.get_dense(name)
        assert w is not None
        return w

    report = build_report(method, cfg, scope, targets, zeros, extra)
    return pruned_model(ckpt, scope, produce, report, cleanup)


def prune_by_layer(
    method: str,
    ckpt: Checkpoint,
    cfg: UnstructuredScope,
    ctx: PruneContext,
    stats: Callable[[LayerRunner, torch.nn.Module, torch.Tensor, dict[str, torch.nn.Linear]], Any],
    prune_one: Callable[[torch.Tensor, Any, float], torch.Tensor],
    stats_of_inputs: Callable[[list[torch.Tensor]], Any],
) -> PrunedModel:
    """A calibrated method as two steps: the statistics a Linear needs from its inputs, and
    how one weight is pruned given them and the layer's sparsity (`prune_one`).

    Normally each layer is pruned in one pass (`cllm.core.prune.sequential`), where
    `stats_of_inputs` turns one Linear's inputs from every batch into its statistics. When
    the calibration set is too large for that pass's memory, `stats` gathers them in a pass
    of the dense layer and the pruned layer is run a second time for its outputs."""
    from cllm.core.prune import sequential

    scope = select_scope(ckpt, cfg)
    targets, extra = layer_sparsities(ckpt, cfg, ctx, scope)
    calib = calibration_of(ckpt, cfg, ctx)
    one_pass = sequential.fits(ckpt.config, int(calib.ids.numel()))
    extra = {**extra, "passes_per_layer": 1 if one_pass else 2}

    def prune_layer(
        runner: LayerRunner,
        i: int,
        layer: torch.nn.Module,
        hidden: torch.Tensor,
        linears: dict[str, torch.nn.Linear],
        sparsity: float,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        if not one_pass:
            st = stats(runner, layer, hidden, linears)
            return {n: prune_one(m.weight.data, st[n], sparsity) for n, m in linears.items()}, None
        pruned: dict[str, torch.Tensor] = {}
        # (the inputs, their statistics); held, not compared by id, which a freed tensor's
        # successor may reuse
        last: list[Any] = [[], None]

        def prune(name: str, mod: torch.nn.Linear, inputs: list[torch.Tensor]) -> None:
            same = len(inputs) == len(last[0]) and all(
                a is b for a, b in zip(inputs, last[0], strict=True)
            )
            if not same:  # q/k/v (and gate/up) read the same tensors: one statistic
                last[0], last[1] = inputs, stats_of_inputs(inputs)
            w = prune_one(mod.weight.data, last[1], sparsity)
            pruned[name] = w
            mod.weight.data = w.to(mod.weight.dtype)

        outputs = sequential.prune_in_one_pass(runner, layer, hidden, linears, prune)
        return pruned, outputs

    return layerwise_result(method, ckpt, cfg, ctx, scope, targets, prune_layer, extra)
