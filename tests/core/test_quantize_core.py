"""Grids, RTN and GPTQ on synthetic weights with a fixed Hessian: exact expectations and properties."""

from __future__ import annotations

import pytest
import torch

from cllm.core.quantize.gptq import HessianAccumulator, gptq_quantize
from cllm.core.quantize.grid import (
    CLIP_NORM,
    GGUFGrid,
    GroupParams,
    IntGrid,
    dequantize_groups,
    fit_clipped,
    quantize_rtn,
)
from cllm.errors import UsageError


def _inputs(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Correlated inputs with uneven channel scales, like real activations."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, dim // 4, generator=g)
    mix = torch.randn(dim // 4, dim, generator=g)
    scale = torch.exp(torch.randn(dim, generator=g))
    return (base @ mix + 0.1 * torch.randn(n, dim, generator=g)) * scale


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_codes_in_range_and_error_bounded(bits: int, sym: bool) -> None:
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(bits))
    grid = IntGrid(bits, 32, sym)
    codes, scales, zeros = quantize_rtn(w, grid)
    assert codes.min() >= 0 and codes.max() <= (1 << bits) - 1
    assert torch.equal(codes, codes.round())
    assert scales.shape == zeros.shape == (16, 4)
    if sym:
        assert torch.all(zeros == (1 << (bits - 1)))
    else:
        assert torch.equal(zeros, zeros.round())
    deq = dequantize_groups(codes, scales, zeros, 32)
    step = scales.repeat_interleave(32, dim=1)
    # nearest rounding: half a step, except the clipped top code of a symmetric grid
    assert torch.all((deq - w).abs() <= step * (1.0 if sym else 0.5) + 1e-6)


def test_per_channel_ragged_and_bad_group_sizes() -> None:
    w = torch.randn(4, 96)
    codes, scales, _ = quantize_rtn(w, IntGrid(4, -1, True))
    assert scales.shape == (4, 1)
    # 96 = 64 + 32: a shorter last group, fitted on its own columns (as GPTQ does)
    codes, scales, zeros = quantize_rtn(w, IntGrid(4, 64, True))
    assert scales.shape == (4, 2)
    tail = quantize_rtn(w[:, 64:], IntGrid(4, -1, True))
    assert torch.equal(codes[:, 64:], tail[0]) and torch.equal(scales[:, 1:], tail[1])
    with pytest.raises(UsageError):
        quantize_rtn(torch.randn(4, 48), GGUFGrid("Q4_0"))  # GGUF blocks must tile the row
    with pytest.raises(UsageError):
        IntGrid(9, 128, True)
    with pytest.raises(UsageError):
        IntGrid(4, 48, True)


def test_hessian_accumulator_matches_direct_formula() -> None:
    x = _inputs(300, 32)
    acc = HessianAccumulator(32)
    for chunk in x.split(70):
        acc.add(chunk)
    assert torch.allclose(acc.H, 2 * x.t() @ x / 300, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "grid",
    [
        IntGrid(4, 32, True),
        IntGrid(3, 64, False),
        IntGrid(4, -1, True),
        GGUFGrid("Q4_0"),
        GGUFGrid("Q5_1"),
    ],
    ids=lambda g: g.describe(),
)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_layer_output_error(grid: IntGrid | GGUFGrid, act_order: bool) -> None:
    x = _inputs(1024, 128, seed=1)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    H = 2 * x.t() @ x / x.shape[0]
    res = gptq_quantize(w, H, grid, act_order=act_order)
    codes, scales, zeros = quantize_rtn(w, grid)
    rtn = dequantize_groups(codes, scales, zeros, grid.group_width(128))

    def out_err(q: torch.Tensor) -> float:
        return float(((x @ q.t() - x @ w.t()) ** 2).mean())

    assert out_err(res.weight) < 0.8 * out_err(rtn)
    # what GPTQ returns is self-consistent: codes and scales reproduce its weights
    assert torch.allclose(
        dequantize_groups(res.codes, res.scales, res.zeros, grid.group_width(128)),
        res.weight,
        atol=1e-5,
    )
    assert res.codes.min() >= 0 and res.codes.max() <= grid.maxq


def test_gguf_grid_scales_are_fp16_exact() -> None:
    w = torch.randn(8, 64)
    for qtype in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        codes, scales, zeros = quantize_rtn(w, GGUFGrid(qtype))
        assert torch.equal(scales, scales.half().float()), qtype
        if qtype.endswith("_1"):
            mins = -zeros * scales
            assert torch.allclose(mins, mins.half().float(), atol=1e-7), qtype


def test_dead_input_columns_are_zeroed() -> None:
    x = _inputs(256, 64)
    x[:, 5] = 0
    w = torch.randn(16, 64)
    res = gptq_quantize(w, 2 * x.t() @ x / 256, IntGrid(4, 32, True))
    assert torch.all(res.weight[:, 5].abs() <= res.scales[:, 0] * 0.5 + 1e-6)


GRIDS = [
    IntGrid(3, 64, True),
    IntGrid(3, 64, False),
    IntGrid(4, 32, True),
    GGUFGrid("Q4_0"),
    GGUFGrid("Q4_1"),
    GGUFGrid("Q5_0"),
    GGUFGrid("Q8_0"),
]


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: g.describe())
def test_clip_search_never_raises_group_error(grid: IntGrid | GGUFGrid) -> None:
    # heavy-tailed rows, as LLM weights are: a few large weights stretch min-max scales
    torch.manual_seed(3)
    w = torch.distributions.StudentT(3.0).sample((256, 32)) * 0.02
    w[0] = 0.0  # a constant group stays exact
    plain, clipped = grid.fit(w), fit_clipped(grid, w, clip=True)
    assert torch.equal(fit_clipped(grid, w).scale, plain.scale)

    def err(p: GroupParams) -> torch.Tensor:
        return (grid.dequantize(grid.quantize(w, p), p) - w).abs().pow(CLIP_NORM).sum(dim=1)

    e_plain, e_clip = err(plain), err(clipped)
    assert (e_clip <= e_plain).all()
    if grid.bits <= 5:  # it finds real gains on heavy tails (at 8 bits shrinking never pays)
        assert e_clip.sum() < 0.99 * e_plain.sum()
    assert float(e_clip[0]) == 0.0
    if isinstance(grid, GGUFGrid):  # still the type's exact format: fp16 scales
        assert torch.equal(clipped.scale, clipped.scale.half().float())


def test_gptq_with_clip_search_lowers_output_error_at_3_bits() -> None:
    x = _inputs(1024, 128, seed=1)
    torch.manual_seed(4)
    w = torch.distributions.StudentT(3.0).sample((64, 128)) * 0.02
    H = 2 * x.t() @ x / x.shape[0]
    grid = IntGrid(3, 64, True)

    def out_err(q: torch.Tensor) -> float:
        return float(((x @ q.t() - x @ w.t()) ** 2).mean())

    plain = gptq_quantize(w, H, grid, act_order=True)
    clipped = gptq_quantize(w, H, grid, act_order=True, clip=True)
    assert out_err(clipped.weight) < 0.99 * out_err(plain.weight)
    assert torch.allclose(
        dequantize_groups(clipped.codes, clipped.scales, clipped.zeros, 64),
        clipped.weight,
        atol=1e-6,
    )


def test_static_groups_equal_group_by_group_fits() -> None:
    from cllm.core.quantize.gptq import _static_groups

    torch.manual_seed(5)
    w = torch.distributions.StudentT(3.0).sample((16, 160)) * 0.02  # 2 full groups of 64 + 32
    for grid in (IntGrid(3, 64, True), IntGrid(4, 64, False)):
        for clip in (False, True):
            got = _static_groups(w, grid, 64, clip)
            assert len(got) == 3
            for j, p in enumerate(got):
                want = fit_clipped(grid, w[:, j * 64 : (j + 1) * 64], clip)
                assert torch.equal(p.scale, want.scale) and torch.equal(p.zero, want.zero)


@pytest.mark.parametrize("dim", [32, 192, 500])
def test_hessian_strips_give_the_full_symmetric_product(dim: int) -> None:
    x = _inputs(600, dim - dim % 4)
    x = torch.cat([x, torch.randn(600, dim % 4)], dim=1)
    acc = HessianAccumulator(dim)
    acc.add(x[:250])
    assert torch.allclose(acc.H, 2 * x[:250].t() @ x[:250] / 250, rtol=1e-4, atol=1e-3)
    acc.add(x[250:])  # more rows after H was read
    want = 2 * x.t() @ x / 600
    assert torch.equal(acc.H, acc.H.t())
    assert torch.allclose(acc.H, want, rtol=1e-4, atol=1e-3)
