"""Unstructured and N:M pruning: masks, the three methods' criteria, OWL's allocation, and the
handlers end to end on the tiny Llama."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cllm.core.prune.base import PruneContext, PrunedModel
from cllm.core.prune.layerwise import collect_input_sumsq
from cllm.core.prune.magnitude import MagnitudeConfig, magnitude_prune, prune_magnitude
from cllm.core.prune.masks import apply_mask, nm_mask, unstructured_mask
from cllm.core.prune.owl import layer_outlier_ratio, owl_sparsities
from cllm.core.prune.sparsegpt import SparseGPTConfig, prune_sparsegpt, sparsegpt_prune
from cllm.core.prune.wanda import WandaConfig, prune_wanda, wanda_prune, wanda_scores
from cllm.errors import UsageError
from cllm.formats.checkpoint import open_checkpoint

HANDLERS = {
    "magnitude": (MagnitudeConfig, prune_magnitude),
    "wanda": (WandaConfig, prune_wanda),
    "sparsegpt": (SparseGPTConfig, prune_sparsegpt),
}


# -- masks ----------------------------------------------------------------------------------


def test_magnitude_mask_on_a_hand_made_matrix() -> None:
    W = torch.tensor(
        [
            [3.0, -1.0, 1.0, 5.0, -2.0],  # |.| ties at 1: the earlier column goes first
            [-4.0, 0.1, 2.0, -0.2, 3.0],
            [1.0, 1.0, 1.0, 1.0, 1.0],
        ]
    )
    out = magnitude_prune(W, 0.4)  # floor(0.4 * 5) = 2 per row
    expected = torch.tensor(
        [
            [3.0, 0.0, 0.0, 5.0, -2.0],
            [-4.0, 0.0, 2.0, 0.0, 3.0],
            [0.0, 0.0, 1.0, 1.0, 1.0],
        ]
    )
    assert torch.equal(out, expected)
    # 0.3 * 10 is 2.9999999999999996 in floats; the count is still 3
    assert int((~unstructured_mask(torch.rand(4, 10), 0.3)).sum(1).unique()) == 3
    assert unstructured_mask(torch.rand(3, 7), 0.0).all()
    # bf16 stays bf16, pruned entries are +0 (never -0.0)
    half = magnitude_prune(-torch.ones(2, 4, dtype=torch.bfloat16), 0.5)
    assert half.dtype == torch.bfloat16
    assert torch.equal(torch.signbit(half[:, :2]), torch.zeros(2, 2, dtype=torch.bool))


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 2)])
def test_nm_pattern_holds_in_every_group(n: int, m: int) -> None:
    gen = torch.Generator().manual_seed(0)
    score = torch.rand(16, 64, generator=gen)
    mask = nm_mask(score, n, m)
    groups = mask.reshape(16, 64 // m, m)
    assert bool((groups.sum(-1) == n).all())
    s = score.reshape(16, 64 // m, m)
    kept_min = torch.where(groups, s, torch.inf).amin(-1)
    pruned_max = torch.where(~groups, s, -torch.inf).amax(-1)
    assert bool((kept_min >= pruned_max).all())  # the N largest of each group are kept
    W = torch.randn(16, 64, generator=gen)
    assert torch.equal(apply_mask(W, mask) == 0, ~mask)


def test_nm_mask_rejects_a_row_m_does_not_tile() -> None:
    with pytest.raises(UsageError, match="30 input weights"):
        nm_mask(torch.rand(4, 30), 2, 4)


# -- criteria -------------------------------------------------------------------------------


def test_wanda_metric_matches_a_hand_computed_example() -> None:
    W = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    X = torch.tensor([[4.0, 0.0], [0.0, 1.0]])  # two tokens: ||X_0|| = 4, ||X_1|| = 1
    sumsq = X.square().sum(0)
    scores = wanda_scores(W, sumsq)
    assert torch.allclose(scores, torch.tensor([[4.0, 2.0], [12.0, 0.5]]))
    # magnitude would drop the 1.0 of row 0; the busy input channel makes it the one to keep
    assert torch.equal(wanda_prune(W, sumsq, 0.5), torch.tensor([[1.0, 0.0], [3.0, 0.0]]))
    assert torch.equal(magnitude_prune(W, 0.5), torch.tensor([[0.0, -2.0], [3.0, 0.0]]))


def test_input_norms_are_collected_from_the_layer_inputs(tiny_model: Path, calib) -> None:  # noqa: ANN001
    from cllm.core.quantize.layerwise import LayerRunner, linear_modules

    runner = LayerRunner(open_checkpoint(tiny_model), batch_size=8, compute_dtype="fp32")
    layer = runner.build_layer(0)
    hidden = runner.embed(calib.ids)
    linears = linear_modules(layer)
    sums = collect_input_sumsq(runner, layer, hidden, linears)
    with torch.no_grad():
        x = layer.input_layernorm(hidden)
    expected = x.reshape(-1, x.shape[-1]).double().square().sum(0)
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        assert torch.allclose(sums[name], expected, rtol=1e-5)
    assert sums["mlp.gate_proj"] is sums["mlp.up_proj"]  # one shared input, summed once
    assert not torch.allclose(sums["mlp.down_proj"][:64], expected, rtol=1e-2)


def _correlated_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs driven by a few shared factors (strongly correlated columns), uneven scales."""
    gen = torch.Generator().manual_seed(0)
    Z = torch.randn(4096, 12, generator=gen)
    A = torch.randn(12, 64, generator=gen)
    X = (Z @ A + 0.1 * torch.randn(4096, 64, generator=gen)) * torch.linspace(0.2, 3.0, 64)[
        torch.randperm(64, generator=gen)
    ]
    W = torch.randn(48, 64, generator=gen)
    H = 2 / X.shape[0] * X.T @ X
    return W, X, H


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_reconstructs_outputs_better_than_magnitude_and_wanda(nm) -> None:  # noqa: ANN001
    W, X, H = _correlated_problem()

    def err(Wp: torch.Tensor) -> float:
        return float(torch.linalg.norm(X @ W.T - X @ Wp.T))

    sg = sparsegpt_prune(W, H, 0.5, nm)
    wa = wanda_prune(W, X.square().sum(0), 0.5, nm)
    mag = magnitude_prune(W, 0.5, nm)
    for Wp in (sg, wa, mag):  # the same budget: exactly half of every row
        assert bool(((Wp == 0).sum(1) == 32).all())
    assert err(sg) < 0.5 * min(err(wa), err(mag))
    if nm:
        assert bool(((sg.reshape(48, 16, 4) != 0).sum(-1) == 2).all())


def test_sparsegpt_rows_reach_the_exact_count_across_uneven_blocks() -> None:
    W, _X, H = _correlated_problem()
    out = sparsegpt_prune(W, H, 0.3, blocksize=24)  # blocks of 24, 24, 16 columns
    assert bool(((out == 0).sum(1) == math.floor(0.3 * 64)).all())


# -- OWL ------------------------------------------------------------------------------------


def test_owl_keeps_the_overall_sparsity_and_favours_outlier_layers() -> None:
    ratios = [0.01, 0.05, 0.02, 0.09, 0.03]
    sp = owl_sparsities(ratios, 0.5, 0.08)
    assert sum(sp) / len(sp) == pytest.approx(0.5, abs=1e-12)
    assert all(0.42 - 1e-12 <= s <= 0.58 + 1e-12 for s in sp)
    order = sorted(range(5), key=lambda i: ratios[i])
    assert [sp[i] for i in order] == sorted(sp, reverse=True)  # more outliers, more density
    # linear in the ratios ([.58, .50, .56, .42, .54]), shifted by -0.02 to the mean; the
    # richest layer stops at the bound and the others take up the difference
    assert sp[3] == pytest.approx(0.42) and sp[0] == pytest.approx(0.555)
    assert sp[0] - sp[2] == pytest.approx(0.02) and sp[2] - sp[4] == pytest.approx(0.02)
    # parameter-weighted: the overall fraction of pruned weights is the target
    weights = [1, 3, 1, 2, 5]
    sw = owl_sparsities(ratios, 0.6, 0.1, weights)
    assert sum(s * w for s, w in zip(sw, weights, strict=True)) / sum(weights) == pytest.approx(
        0.6, abs=1e-12
    )
    # one outlier-poor layer among rich ones: the shift would leave the range, bounds hold
    sc = owl_sparsities([0.0, 1.0, 1.0, 1.0], 0.5, 0.08)
    assert sum(sc) / 4 == pytest.approx(0.5, abs=1e-12) and sc[0] == pytest.approx(0.58)
    assert owl_sparsities([0.2, 0.2], 0.5, 0.08) == [0.5, 0.5]
    assert layer_outlier_ratio([torch.tensor([1.0, 1.0, 1.0, 9.0])], 2.0) == 0.25


# -- handlers end to end --------------------------------------------------------------------


def _tensors(result: PrunedModel) -> dict[str, torch.Tensor]:
    out = {}
    for p in result.plans:
        t = p.produce()
        assert tuple(t.shape) == tuple(p.shape)
        out[p.name] = t
    return out


def _run(tiny_model: Path, calib, method: str, ctx: PruneContext | None = None, **kw):  # noqa: ANN001, ANN202
    config_cls, handler = HANDLERS[method]
    cfg = config_cls(compute_dtype="fp32", **kw)
    cfg.validate()
    ckpt = open_checkpoint(tiny_model)
    ctx = ctx or PruneContext()
    if ctx.calibration is None and cfg.needs_calibration():
        ctx.calibration = calib
    result = handler(ckpt, cfg, ctx)
    tensors = _tensors(result)
    if result.cleanup:
        result.cleanup()
    return ckpt, result, tensors


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_handlers_prune_every_row_exactly(tiny_model: Path, calib, method: str) -> None:  # noqa: ANN001
    ckpt, result, out = _run(tiny_model, calib, method, sparsity=0.45)
    pruned = set(result.report["pruned_tensors"])
    assert len(pruned) == 14 == result.report["pruned_tensor_count"]  # 7 linears x 2 layers
    for name, t in out.items():
        if name in pruned:
            cols = t.shape[1]
            assert bool(((t == 0).sum(1) == math.floor(0.45 * cols)).all()), name
            if method != "sparsegpt":  # the kept weights are the input's, untouched
                keep = t != 0
                assert torch.equal(t[keep], ckpt.get(name)[keep])
        else:
            assert torch.equal(t, ckpt.get(name)), name
    assert not any("embed" in n or "norm" in n or "lm_head" in n for n in pruned)
    assert "quantization_config" not in result.config
    zeros = sum(int((out[n] == 0).sum()) for n in pruned)
    total = sum(out[n].numel() for n in pruned)
    assert result.report["achieved_sparsity"] == zeros / total
    for row in result.report["layers"]:
        assert row["target"] == 0.45
        assert row["achieved"] == pytest.approx(0.45, abs=1 / 64)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_handlers_honour_pattern_layers_and_keep(tiny_model: Path, calib, method: str) -> None:  # noqa: ANN001
    ckpt, result, out = _run(
        tiny_model, calib, method, pattern="2:4", layers="1", keep=[r"mlp\.down_proj"]
    )
    pruned = set(result.report["pruned_tensors"])
    assert pruned == {
        f"model.layers.1.{n}.weight"
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
        + ("mlp.gate_proj", "mlp.up_proj")
    }
    for name, t in out.items():
        if name in pruned:
            groups = (t != 0).reshape(t.shape[0], -1, 4).sum(-1)
            assert bool((groups == 2).all()), name
        else:
            assert torch.equal(t, ckpt.get(name)), name
    assert [r["layer"] for r in result.report["layers"]] == [1]
    assert result.report["achieved_sparsity"] == 0.5


def test_resume_after_a_partial_run_gives_identical_weights(
    tiny_model: Path,
    calib,  # noqa: ANN001
    tmp_path: Path,
) -> None:
    class Killed(Exception):
        pass

    def kill_after_layer_0(i: int, n: int) -> None:
        if i == 0:
            raise Killed

    state = tmp_path / "state"
    with pytest.raises(Killed):
        _run(
            tiny_model, calib, "sparsegpt",
            PruneContext(calib, state, "job-1", on_layer=kill_after_layer_0),
        )  # fmt: skip
    assert (state / "layer-0000.safetensors").exists()
    assert not (state / "layer-0001.safetensors").exists()
    done: list[int] = []
    _, _, resumed = _run(
        tiny_model, calib, "sparsegpt",
        PruneContext(calib, state, "job-1", resume=True, on_layer=lambda i, n: done.append(i)),
    )  # fmt: skip
    assert done == [1]  # layer 0 came from the state folder
    assert not state.exists()  # cleanup removed it
    _, _, fresh = _run(tiny_model, calib, "sparsegpt", PruneContext(calib, tmp_path / "other"))
    assert resumed.keys() == fresh.keys()
    for name in fresh:
        assert torch.equal(resumed[name], fresh[name]), name


def test_owl_profile_end_to_end(tiny_model: Path, calib) -> None:  # noqa: ANN001
    _, result, out = _run(tiny_model, calib, "wanda", sparsity=0.5, profile="owl", owl_lambda=0.1)
    layers = result.report["layers"]
    ratios = result.report["owl_outlier_ratios"]
    targets = [r["target"] for r in layers]
    assert sum(targets) / 2 == pytest.approx(0.5, abs=1e-12)  # the two layers are equal in size
    assert ratios["0"] != ratios["1"] and targets[0] != targets[1]
    richer = 0 if ratios["0"] > ratios["1"] else 1
    assert targets[richer] == pytest.approx(0.4) and targets[1 - richer] == pytest.approx(0.6)
    assert result.report["achieved_sparsity"] == pytest.approx(0.5, abs=1 / 64)
    for name in result.report["pruned_tensors"]:
        t = out[name]
        s = targets[int(name.split(".")[2])]
        assert bool(((t == 0).sum(1) == math.floor(s * t.shape[1] + 1e-9)).all())
    # the ratios are the dense model's: each layer's Wanda scores on dense inputs
    from cllm.core.quantize.layerwise import LayerRunner, linear_modules

    runner = LayerRunner(open_checkpoint(tiny_model), batch_size=8, compute_dtype="fp32")
    hidden = runner.embed(calib.ids)
    for i in range(2):
        layer = runner.build_layer(i)
        linears = linear_modules(layer)
        sums = collect_input_sumsq(runner, layer, hidden, linears)
        scores = [wanda_scores(m.weight.data, sums[n]) for n, m in linears.items()]
        assert ratios[str(i)] == pytest.approx(layer_outlier_ratio(scores, 5.0), abs=1e-4)
        hidden = runner.forward(layer, hidden)
    # magnitude with OWL needs calibration (for the outliers); without it, none
    assert MagnitudeConfig(profile="owl").needs_calibration()
    assert not MagnitudeConfig().needs_calibration()


def test_a_sensitivity_profile_sets_each_layer(tiny_model: Path, calib) -> None:  # noqa: ANN001
    ctx = PruneContext(layer_sparsity=[0.25, 0.75])
    _, result, out = _run(tiny_model, calib, "magnitude", ctx, profile="file")
    assert [r["target"] for r in result.report["layers"]] == [0.25, 0.75]
    q0 = out["model.layers.0.self_attn.q_proj.weight"]
    q1 = out["model.layers.1.self_attn.q_proj.weight"]
    assert bool(((q0 == 0).sum(1) == 16).all()) and bool(((q1 == 0).sum(1) == 48).all())


def test_pruned_model_saves_and_loads(tiny_model: Path, calib, tmp_path: Path) -> None:  # noqa: ANN001
    from cllm.formats.save import save_hf_folder

    ckpt = open_checkpoint(tiny_model)
    result = prune_wanda(ckpt, WandaConfig(compute_dtype="fp32"), PruneContext(calib))
    out = save_hf_folder(
        tmp_path / "pruned", result.config, result.plans, ckpt.tokenizer_dir(), {}, {}
    )
    assert result.cleanup is not None
    result.cleanup()
    back = open_checkpoint(out)
    w = back.get("model.layers.1.mlp.down_proj.weight")
    assert bool(((w == 0).sum(1) == 64).all())


@pytest.mark.parametrize(
    "kw,ctx,match",
    [
        ({"layers": "0-5"}, None, "names layer 5, but the model has 2"),
        ({"pattern": "2:3"}, None, "groups of 3 do not tile"),
        ({"keep": [r"_proj"]}, None, "no decoder-layer linear weights are left"),
        ({"profile": "file"}, PruneContext(layer_sparsity=[0.5]), "profile has 1 layers"),
        ({"profile": "file"}, PruneContext(layer_sparsity=[0.5, 1.0]), "outside"),
        ({"profile": "file"}, PruneContext(), "needs per-layer sparsities"),
    ],
)
def test_bad_inputs_raise_usage_errors(
    tiny_model: Path,
    calib,  # noqa: ANN001
    kw: dict,
    ctx: PruneContext | None,
    match: str,
) -> None:
    with pytest.raises(UsageError, match=match):
        _run(tiny_model, calib, "magnitude", ctx, **kw)


def test_bad_sparsegpt_options_raise_usage_errors() -> None:
    with pytest.raises(UsageError, match="--damp"):
        SparseGPTConfig(damp=0).validate()
    with pytest.raises(UsageError, match="--blocksize"):
        SparseGPTConfig(blocksize=0).validate()


def test_a_quantized_gguf_input_is_dequantized_and_pruned(tiny_model: Path, tmp_path: Path) -> None:
    from cllm.formats.provenance import make_provenance
    from cllm.formats.save import save_gguf

    src = open_checkpoint(tiny_model)
    gguf = tmp_path / "tiny.Q8_0.gguf"
    save_gguf(gguf, src, "Q8_0", make_provenance("export", {}, "0" * 64, None))
    ckpt = open_checkpoint(gguf)
    result = prune_magnitude(ckpt, MagnitudeConfig(), PruneContext())
    plans = {p.name: p for p in result.plans}
    for name in result.report["pruned_tensors"]:
        assert plans[name].dtype == "F32"
        w = plans[name].produce()
        assert bool(((w == 0).sum(1) == w.shape[1] // 2).all()), name
        # the kept weights are the dequantized ones
        keep = w != 0
        assert torch.equal(w[keep], ckpt.get(name).float()[keep])


def test_later_layers_see_the_pruned_outputs_of_earlier_ones(tiny_model: Path, calib) -> None:  # noqa: ANN001
    _, _, both = _run(tiny_model, calib, "wanda")
    _, _, second = _run(tiny_model, calib, "wanda", layers="1")
    names = [n for n in both if n.startswith("model.layers.1.") and n.endswith("_proj.weight")]
    # q/k/v read the first layer's output directly: pruning layer 0 changes which weights go
    assert any(not torch.equal(both[n] == 0, second[n] == 0) for n in names)
