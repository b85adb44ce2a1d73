"""Pruning a layer in one pass (`cllm.core.prune.sequential`): each Linear is pruned from the
inputs that reach it through the already-pruned Linears before it, the outputs are those of
the pruned layer, the result does not depend on thread timing, and a failure stops every
batch instead of hanging."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cllm.core.prune import sequential
from cllm.core.prune.layerwise import collect_input_sumsq
from cllm.core.prune.wanda import input_sumsq, wanda_prune
from cllm.formats.checkpoint import open_checkpoint
from tests.core.test_prune_unstructured import _run


def _layer0(tiny_model: Path, calib, batch_size: int = 4):  # noqa: ANN001, ANN202
    from cllm.core.quantize.layerwise import LayerRunner, linear_modules

    runner = LayerRunner(open_checkpoint(tiny_model), batch_size=batch_size, compute_dtype="fp32")
    layer = runner.build_layer(0)
    return runner, layer, runner.embed(calib.ids), linear_modules(layer)


def test_each_linear_is_pruned_from_inputs_through_the_pruned_ones_before_it(
    tiny_model: Path,
    calib,  # noqa: ANN001
) -> None:
    runner, layer, hidden, linears = _layer0(tiny_model, calib)
    dense = {n: m.weight.data.clone() for n, m in linears.items()}
    order: list[str] = []
    batches_seen: list[int] = []

    def prune(name: str, mod: torch.nn.Linear, inputs: list[torch.Tensor]) -> None:
        order.append(name)
        batches_seen.append(len(inputs))
        mod.weight.data = wanda_prune(mod.weight.data, input_sumsq(inputs), 0.5)

    out = sequential.prune_in_one_pass(runner, layer, hidden, linears, prune)
    # the layer's own forward decides the order; every batch (16 windows / 4) is seen at once
    assert order == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # fmt: skip
    assert batches_seen == [4] * 7
    pruned = {n: m.weight.data.clone() for n, m in linears.items()}

    # outputs are the pruned layer's
    assert torch.allclose(out, runner.forward(layer, hidden), atol=1e-6)

    # q/k/v read the layer input: the same statistics as a dense pass
    dense_layer = _layer0(tiny_model, calib)
    sums = collect_input_sumsq(dense_layer[0], dense_layer[1], dense_layer[2], dense_layer[3])
    for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        assert torch.equal(pruned[n], wanda_prune(dense[n], sums[n], 0.5))
    # o_proj's statistics come through the pruned q/k/v: gather them on a layer that has the
    # pruned q/k/v and the dense rest, and the one-pass mask is what they give
    _, ref_layer, _, ref_linears = _layer0(tiny_model, calib)
    for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        ref_linears[n].weight.data = pruned[n].clone()
    ref = collect_input_sumsq(runner, ref_layer, hidden, ref_linears)
    o = "self_attn.o_proj"
    assert torch.equal(pruned[o], wanda_prune(dense[o], ref[o], 0.5))
    assert not torch.equal(pruned[o] == 0, wanda_prune(dense[o], sums[o], 0.5) == 0)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_one_pass_is_deterministic_and_two_passes_remain_for_large_sets(
    tiny_model: Path,
    calib,  # noqa: ANN001
    method: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, r1, a = _run(tiny_model, calib, method, sparsity=0.5, batch_size=2)
    _, _, b = _run(tiny_model, calib, method, sparsity=0.5, batch_size=2)
    assert r1.report["passes_per_layer"] == 1
    assert all(torch.equal(a[n], b[n]) for n in a)
    monkeypatch.setattr(sequential, "BUDGET_BYTES", 0)
    _, r2, c = _run(tiny_model, calib, method, sparsity=0.5, batch_size=2)
    assert r2.report["passes_per_layer"] == 2
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a[q], c[q])  # the first Linears see the same inputs either way
    assert any(not torch.equal(a[n], c[n]) for n in a if n.endswith("down_proj.weight"))


def test_a_failing_batch_stops_the_others(tiny_model: Path, calib) -> None:  # noqa: ANN001
    runner, layer, hidden, linears = _layer0(tiny_model, calib)

    def prune(name: str, mod: torch.nn.Linear, inputs: list[torch.Tensor]) -> None:
        if name == "self_attn.o_proj":
            raise RuntimeError("broken statistic")

    with pytest.raises(RuntimeError, match="broken statistic"):
        sequential.prune_in_one_pass(runner, layer, hidden, linears, prune)

    calls = []

    def hook(_mod: torch.nn.Module, _inputs: tuple[torch.Tensor, ...]) -> None:
        calls.append(1)
        if len(calls) == 3:  # one batch fails inside the layer, before its first Linear
            raise ValueError("batch 3 failed")

    handle = layer.input_layernorm.register_forward_pre_hook(hook)
    try:
        with pytest.raises(ValueError, match="batch 3 failed"):
            sequential.prune_in_one_pass(runner, layer, hidden, linears, lambda *a: None)
    finally:
        handle.remove()


def test_the_memory_rule_depends_on_sizes_only() -> None:
    cfg = {"hidden_size": 576, "intermediate_size": 1536}
    assert sequential.activation_bytes(cfg, 128 * 512) == 128 * 512 * (1536 + 5 * 576) * 4
    assert sequential.fits(cfg, 128 * 512)
    assert not sequential.fits({"hidden_size": 4096, "intermediate_size": 14336}, 128 * 2048)
