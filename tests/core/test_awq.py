"""AWQ: the scale search, folding that keeps the layer's function, and whole-model outputs
(fake, packed, GGUF) on the tiny Llama, through Python and the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cllm.core.quantize.api import Target, quantize, state_dir
from cllm.core.quantize.awq import (
    AWQConfig,
    awq_layer,
    awq_scales,
    collect_stats,
    fold_scales,
    layer_groups,
    layer_output,
    output_error,
    rtn_dequantized,
    search_scale,
)
from cllm.core.quantize.grid import GGUFGrid, IntGrid
from cllm.core.quantize.layerwise import LayerRunner
from cllm.core.quantize.methods import RTNConfig, select_tensors
from cllm.errors import UsageError
from cllm.formats.checkpoint import open_checkpoint
from tests.conftest import assert_transformers_matches_cllm, kld_vs_base, quant_provenance, run_cli

NORMS = ("model.layers.0.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight")


@pytest.fixture(scope="module")
def mha_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama without grouped-query attention, where o_proj's scales fold into v_proj."""
    from cllm.testing.tiny import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("mha") / "tiny-mha", num_key_value_heads=4)


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with a few outlier activation channels, as real LLMs have and AWQ is
    for: each norm's weight is 8x on 4 channels and the columns it feeds are /8, so the
    function is the same but those inputs are large and their weights small. (On the plain
    random tiny model AWQ has nothing to find; RTN and AWQ+RTN tie within noise there.)"""
    from cllm.testing.tiny import tiny_llama, tiny_tokenizer

    model = tiny_llama(0)
    channels = [3, 17, 40, 58]
    with torch.no_grad():
        for layer in model.model.layers:
            for norm, consumers in (
                (layer.input_layernorm, ("q_proj", "k_proj", "v_proj")),
                (layer.post_attention_layernorm, ("gate_proj", "up_proj")),
            ):
                norm.weight[channels] *= 8
                parent = layer.self_attn if consumers[0] == "q_proj" else layer.mlp
                for name in consumers:
                    getattr(parent, name).weight[:, channels] /= 8
    folder = tmp_path_factory.mktemp("outliers") / "tiny-outliers"
    model.save_pretrained(str(folder), safe_serialization=True)
    tiny_tokenizer().save_pretrained(str(folder))
    return folder


# -- the scale search on synthetic data -----------------------------------------------


@pytest.mark.parametrize(
    "grid",
    [IntGrid(3, 32, True), IntGrid(4, 32, False), GGUFGrid("Q4_0")],
    ids=lambda g: g.describe(),
)
def test_search_prefers_scaling_the_large_activation_channels(grid: IntGrid | GGUFGrid) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 128, generator=g)
    x[:, [3, 40, 77, 100]] *= 25  # a few channels with large activations, as in real LLMs
    w = torch.randn(96, 128, generator=g)
    H = 2 * x.t() @ x / x.shape[0]
    found = search_scale([w[:64], w[64:]], x.abs().mean(0), H, grid, grid_points=20)
    assert len(found.errors) == 20
    assert found.alpha > 0
    best = found.errors[round(found.alpha * 20)]
    assert best == min(found.errors) and best < 0.8 * found.errors[0]  # alpha = 0 is plain RTN
    # the objective is the Linears' output error on these inputs
    s = found.scales
    q = rtn_dequantized(w * s, grid)
    direct = float(((x / s) @ q.t() - x @ w.t()).pow(2).sum(1).mean())
    assert output_error(q / s - w, H) == pytest.approx(direct, rel=1e-3)
    assert direct == pytest.approx(best, rel=1e-3)


def test_search_never_loses_to_rtn_and_alpha_zero_is_rtn() -> None:
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(1))  # no outliers
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    H = 2 * x.t() @ x / x.shape[0]
    found = search_scale([w], x.abs().mean(0), H, IntGrid(4, 32, True), grid_points=10)
    assert min(found.errors) <= found.errors[0]
    assert found.errors[round(found.alpha * 10)] == min(found.errors)
    assert torch.equal(awq_scales(x.abs().mean(0), 0.0), torch.ones(64))
    s = awq_scales(x.abs().mean(0), 0.5)
    assert float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-5)


def test_config_validation() -> None:
    AWQConfig(then="gptq", act_order=True).validate()
    for bad, needle in (
        (AWQConfig(then="spqr"), "--awq-then"),
        (AWQConfig(grid_points=0), "--awq-grid"),
        (AWQConfig(act_order=True), "--act-order"),
        (AWQConfig(damp=2.0), "--damp"),
        (AWQConfig(compute_dtype="fp8"), "--calib-dtype"),
    ):
        with pytest.raises(UsageError, match=needle):
            bad.validate()
    assert AWQConfig().to_dict()["method"] == "awq"


# -- folding on real layers -----------------------------------------------------------


@pytest.mark.parametrize("which", ["gqa", "mha"])
def test_folding_keeps_the_fp32_layer_output(
    which: str, tiny_model: Path, mha_model: Path, calib
) -> None:  # noqa: ANN001
    runner = LayerRunner(open_checkpoint(tiny_model if which == "gqa" else mha_model))
    layer = runner.build_layer(0)
    hidden = runner.embed(calib.ids[:4])
    groups = layer_groups(layer, runner.spec)
    stats = collect_stats(runner, layer, hidden, groups)
    before = layer_output(runner, layer, hidden)
    for grp in groups:
        if grp.producer.endswith("v_proj") and which == "gqa":
            continue  # v's rows do not map onto o's inputs with grouped-query attention
        fold_scales(layer, grp, awq_scales(stats[grp.producer].mean_abs, 0.9))
    after = layer_output(runner, layer, hidden)
    assert float((after - before).abs().max()) < 1e-4
    assert not torch.equal(layer.input_layernorm.weight, runner.ckpt.get(NORMS[0]).float())


def test_o_proj_is_scaled_only_without_grouped_query_attention(
    tiny_model: Path, mha_model: Path, calib
) -> None:  # noqa: ANN001
    """With MHA and v_proj left unquantized (--keep), its folded rows go to the writer as dense tensors."""
    seen, v = {}, "model.layers.0.self_attn.v_proj.weight"
    for which, path in (("gqa", tiny_model), ("mha", mha_model)):
        ckpt = open_checkpoint(path)
        runner = LayerRunner(ckpt)
        wanted = set(select_tensors(ckpt, [r"v_proj"]))
        out = awq_layer(
            runner,
            runner.build_layer(0),
            "model.layers.0.",
            runner.embed(calib.ids[:8]),
            IntGrid(3, 32, True),
            wanted,
            AWQConfig(grid_points=10),
        )
        assert set(out.results) == {n for n in wanted if n.startswith("model.layers.0.")}
        assert out.alphas["input_layernorm"] > 0  # so the kept v_proj's columns were scaled
        seen[which] = out.dense[v] / ckpt.get(v).float()  # s_qkv[col] / s_o[row]
    # GQA: o_proj is not scaled, so v's rows are untouched and every row has the same ratio
    assert torch.allclose(seen["gqa"], seen["gqa"][:1].expand_as(seen["gqa"]), rtol=1e-5)
    # MHA: 1/s of o_proj is folded into v's rows as well
    assert not torch.allclose(seen["mha"], seen["mha"][:1].expand_as(seen["mha"]), rtol=1e-3)


# -- whole model -----------------------------------------------------------------------


def test_awq_is_no_worse_than_rtn_onkld_vs_base(
    outlier_model: Path, tiny_text: Path, calib, tmp_path: Path
) -> None:  # noqa: ANN001
    tiny_model = outlier_model  # same tokenizer as the calibration fixture's model
    ckpt = open_checkpoint(tiny_model)
    target = Target(to="safetensors", bits=3, group_size=32, fake=True)
    quantize(ckpt, RTNConfig(), target, tmp_path / "rtn", quant_provenance({"m": "rtn"}))
    k_rtn = kld_vs_base(tmp_path / "rtn", tiny_model, tiny_text)
    k_awq = {}
    for then in ("rtn", "gptq"):
        out = tmp_path / f"awq-{then}"
        report = quantize(
            ckpt,
            AWQConfig(then=then, calib_samples=16, calib_seqlen=64),
            target,
            out,
            quant_provenance({"m": "awq", "then": then}),
            calibration=calib,
        )
        assert report["quantized_tensors"] == 14
        assert not state_dir(out).exists()  # state is removed once the output is written
        k_awq[then] = kld_vs_base(out, tiny_model, tiny_text)
    assert 0 < k_awq["rtn"] <= k_rtn
    assert 0 < k_awq["gptq"] < k_rtn
    # the folded norms are written; untouched tensors are copied exactly
    q = open_checkpoint(tmp_path / "awq-rtn")
    assert not torch.equal(q.get(NORMS[0]), ckpt.get(NORMS[0]))
    assert torch.equal(q.get("model.embed_tokens.weight"), ckpt.get("model.embed_tokens.weight"))
    assert torch.equal(q.get("model.norm.weight"), ckpt.get("model.norm.weight"))


def test_awq_gguf_runs_in_llamacpp_with_its_folded_norms(
    tiny_model: Path, calib, tmp_path: Path
) -> None:  # noqa: ANN001
    from cllm.core.eval.backends import LlamaCppBackend, TorchBackend

    ckpt = open_checkpoint(tiny_model)
    out = tmp_path / "awq.gguf"
    report = quantize(
        ckpt,
        AWQConfig(calib_samples=16, calib_seqlen=64),
        Target(to="gguf", gguf_type="Q4_0"),
        out,
        quant_provenance({"m": "awq-gguf"}),
        calibration=calib,
    )
    assert report["types"]["Q4_0"] == 14
    q = open_checkpoint(out)
    for name in NORMS[:1]:
        assert not torch.allclose(q.get(name).float(), ckpt.get(name).float())
    ids = np.arange(10, 74) % 256
    backend = LlamaCppBackend(out, ctx=64, threads=2)
    try:
        got = backend.logits(ids)
    finally:
        backend.close()
    assert np.isfinite(got).all()
    # llama.cpp runs the file as cllm reads it: folded norms and AWQ's blocks together
    ours = TorchBackend(q).logits(ids)
    base = TorchBackend(ckpt).logits(ids)
    assert np.abs(got - ours).max() < 0.1 * np.abs(got - base).max()


def test_awq_resume_after_kill_gives_identical_bytes(
    tiny_model: Path, calib, tmp_path: Path
) -> None:  # noqa: ANN001
    """The folded norms of finished layers come back from the state folder."""
    ckpt = open_checkpoint(tiny_model)
    cfg = AWQConfig(calib_samples=16, calib_seqlen=64, grid_points=10)
    target = Target(bits=4, group_size=32)
    prov = quant_provenance({"m": "awq", "resume": True})
    clean = tmp_path / "clean"
    quantize(ckpt, cfg, target, clean, prov, calibration=calib)
    killed = tmp_path / "killed"

    def die(i: int, n: int) -> None:
        if i == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize(ckpt, cfg, target, killed, prov, calibration=calib, on_layer=die)
    seen: list[int] = []
    quantize(
        ckpt, cfg, target, killed, prov, calibration=calib, resume=True,
        on_layer=lambda i, n: seen.append(i),
    )  # fmt: skip
    assert seen == [1]
    a, b = open_checkpoint(clean), open_checkpoint(killed)
    assert set(a.tensor_infos()) == set(b.tensor_infos())
    for name in a.tensor_infos():
        assert torch.equal(a.get(name), b.get(name)), name
    assert not torch.equal(a.get(NORMS[0]), ckpt.get(NORMS[0]))


# -- the CLI ---------------------------------------------------------------------------


def test_cli_awq_packed_loads_in_transformers_like_cllm_reads_it(
    tiny_model: Path, tiny_text: Path, tmp_path: Path
) -> None:

    out = tmp_path / "q"
    p = run_cli(
        "quantize", str(tiny_model), "--method", "awq", "--bits", "4", "--group-size", "32",
        "--calib", str(tiny_text), "--calib-samples", "8", "--calib-seqlen", "64", "-o", str(out),
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout == f"{out}\n"
    prov = open_checkpoint(out).provenance
    assert prov is not None and prov["params"]["method"]["method"] == "awq"
    assert prov["params"]["method"]["then"] == "rtn" and prov["calibration"]["samples"] == 8
    theirs = assert_transformers_matches_cllm(out)
    base = open_checkpoint(tiny_model).get(NORMS[0])
    assert not torch.equal(theirs.model.layers[0].input_layernorm.weight.data, base)

    bad = run_cli(
        "quantize", str(tiny_model), "--method", "awq", "--act-order", "--calib", str(tiny_text),
        "-o", str(tmp_path / "bad"),
    )  # fmt: skip
    assert bad.returncode == 2 and "--awq-then gptq" in bad.stderr, bad.stderr
