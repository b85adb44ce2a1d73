"""Structured (width) and depth pruning: exactness on units that are zero beforehand, outputs
that transformers (and, in the slow tests, llama.cpp and onnxruntime) load as standard
models, the GQA rule, the depth metrics against a direct computation, and bad inputs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from cllm.core.prune.base import PRUNERS, PruneContext, PrunedModel, prune
from cllm.core.prune.depth import DepthConfig, prune_depth
from cllm.core.prune.structured import (
    StructuredConfig,
    gqa_shape,
    hidden_kept,
    prune_structured,
    ranges,
)
from cllm.errors import UsageError
from cllm.formats.checkpoint import open_checkpoint
from cllm.formats.save import save_hf_folder

IDS = torch.tensor([[256, 5, 77, 12, 200, 9, 31, 140, 63, 2, 99, 180, 17, 44, 250, 3, 8, 71]])
PROV = {"id": "test", "op": "prune"}


# -- helpers -------------------------------------------------------------------------------


def _save(model: Any, folder: Path) -> Path:
    from cllm.testing.tiny import tiny_tokenizer

    model.save_pretrained(str(folder), safe_serialization=True)
    tiny_tokenizer().save_pretrained(str(folder))
    return folder


def _logits(model: Any, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _in_memory(pm: PrunedModel) -> Any:
    """The pruned model built straight from the handler's config and planned tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in pm.config.items() if k != "transformers_version"}
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict({p.name: p.produce() for p in pm.plans}, strict=True)
    return model.eval()


def _write_and_reload(pm: PrunedModel, ckpt: Any, out: Path) -> Any:
    """Write the output folder; check transformers loads it as a standard model equal to the
    in-memory one, and cllm reopens it (its shape check passes)."""
    from transformers import AutoModelForCausalLM

    save_hf_folder(out, pm.config, pm.plans, ckpt.tokenizer_dir(), PROV, ckpt.gguf_kv)
    theirs = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert torch.equal(_logits(theirs), _logits(_in_memory(pm)))
    c = theirs.config
    assert c.num_attention_heads % c.num_key_value_heads == 0
    assert c.head_dim == pm.config["head_dim"]
    open_checkpoint(out)
    return theirs


def _prune(folder: Path, cfg: Any, calib: Any) -> tuple[Any, PrunedModel]:
    ckpt = open_checkpoint(folder)
    return ckpt, prune(ckpt, cfg, PruneContext(calibration=calib))


def _tiny(**overrides: Any) -> Any:
    from cllm.testing.tiny import tiny_llama

    return tiny_llama(0, **overrides)


# -- width: exact on zero units --------------------------------------------------------------


def test_methods_are_registered() -> None:
    assert PRUNERS.config_class("structured") is StructuredConfig
    assert PRUNERS.config_class("depth") is DepthConfig
    assert StructuredConfig(target="heads", ratio=0.5).to_dict()["target"] == "heads"
    assert not DepthConfig(metric="last").needs_calibration()
    assert DepthConfig().needs_calibration() and StructuredConfig().needs_calibration()


def test_ffn_channels_that_are_zero_go_first_and_change_nothing(tmp_path: Path, calib: Any) -> None:
    model = _tiny()
    gen = torch.Generator().manual_seed(1)
    zeroed = [sorted(torch.randperm(128, generator=gen)[:32].tolist()) for _ in range(2)]
    with torch.no_grad():
        for layer, z in zip(model.model.layers, zeroed, strict=True):
            layer.mlp.gate_proj.weight[z] = 0
            layer.mlp.up_proj.weight[z] = 0
            layer.mlp.down_proj.weight[:, z] = 0
    src = _save(model, tmp_path / "src")
    ckpt, pm = _prune(src, StructuredConfig(target="mlp", ratio=0.25, compute_dtype="fp32"), calib)
    assert pm.report["removed_indices"] == {str(i): ranges(z) for i, z in enumerate(zeroed)}
    assert pm.config["intermediate_size"] == 96 and pm.config["head_dim"] == 16
    imp = pm.report["importance"]
    assert imp["highest_removed"] == [0.0, 0.0] and min(imp["lowest_kept"]) > 0
    assert pm.report["params_before"] - pm.report["params_after"] == 2 * 3 * 32 * 64
    ours = _write_and_reload(pm, ckpt, tmp_path / "out")
    torch.testing.assert_close(_logits(ours), _logits(model), rtol=1e-5, atol=1e-5)


def test_heads_with_zero_output_go_one_per_kv_group(tmp_path: Path, calib: Any) -> None:
    """4 heads / 2 KV heads, ratio 0.5: one query head leaves each group, every KV head stays.
    The removed heads have zero queries and zero o_proj columns: they still attend (evenly)
    but write nothing, which their contribution through o_proj shows."""
    model = _tiny()
    zeroed = [[0, 3], [1, 2]]  # one head of group 0 and one of group 1, per layer
    with torch.no_grad():
        for layer, z in zip(model.model.layers, zeroed, strict=True):
            for h in z:
                layer.self_attn.q_proj.weight[h * 16 : (h + 1) * 16] = 0
                layer.self_attn.o_proj.weight[:, h * 16 : (h + 1) * 16] = 0
    src = _save(model, tmp_path / "src")
    ckpt, pm = _prune(src, StructuredConfig(target="heads", ratio=0.5, compute_dtype="fp32"), calib)
    assert pm.report["removed_indices"] == {
        str(i): {"heads": ranges(z), "kv_heads": ""} for i, z in enumerate(zeroed)
    }
    assert (pm.config["num_attention_heads"], pm.config["num_key_value_heads"]) == (2, 2)
    ours = _write_and_reload(pm, ckpt, tmp_path / "out")
    torch.testing.assert_close(_logits(ours), _logits(model), rtol=1e-5, atol=1e-5)


def test_whole_kv_group_goes_when_the_count_only_fits_that_way(tmp_path: Path, calib: Any) -> None:
    """6 heads / 3 KV heads, ratio 1/3: 4 heads stay, which 3 groups cannot share, so one
    whole group (KV head + its 2 query heads) goes: the zeroed one."""
    model = _tiny(hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    groups = [1, 2]
    with torch.no_grad():
        for layer, g in zip(model.model.layers, groups, strict=True):
            att = layer.self_attn
            att.k_proj.weight[g * 16 : (g + 1) * 16] = 0
            att.v_proj.weight[g * 16 : (g + 1) * 16] = 0
            att.q_proj.weight[2 * g * 16 : (2 * g + 2) * 16] = 0
            att.o_proj.weight[:, 2 * g * 16 : (2 * g + 2) * 16] = 0
    src = _save(model, tmp_path / "src")
    ckpt, pm = _prune(
        src, StructuredConfig(target="heads", ratio=1 / 3, compute_dtype="fp32"), calib
    )
    assert pm.report["removed_indices"] == {
        str(i): {"heads": f"{2 * g}-{2 * g + 1}", "kv_heads": str(g)} for i, g in enumerate(groups)
    }
    assert (pm.config["num_attention_heads"], pm.config["num_key_value_heads"]) == (4, 2)
    ours = _write_and_reload(pm, ckpt, tmp_path / "out")
    torch.testing.assert_close(_logits(ours), _logits(model), rtol=1e-5, atol=1e-5)


def test_hidden_channels_zero_everywhere_go_and_norms_are_compensated(
    tmp_path: Path, calib: Any
) -> None:
    """Channels zero in the whole residual stream (embedding columns, o_proj and down_proj
    rows): removing them leaves every RMSNorm's sum of squares unchanged but divides it by
    fewer channels, which the sqrt(d/d_new) weight scale (and eps scale) undo exactly.
    Random norm weights make the compensation visible; hidden_size != heads * head_dim after."""
    model = _tiny()
    zeroed = sorted(torch.randperm(64, generator=torch.Generator().manual_seed(2))[:16].tolist())
    with torch.no_grad():
        model.model.embed_tokens.weight[:, zeroed] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[zeroed] = 0
            layer.mlp.down_proj.weight[zeroed] = 0
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    src = _save(model, tmp_path / "src")
    ckpt, pm = _prune(
        src, StructuredConfig(target="hidden", ratio=0.25, compute_dtype="fp32"), calib
    )
    assert pm.report["removed_indices"] == ranges(zeroed)
    cfg = pm.config
    assert (cfg["hidden_size"], cfg["head_dim"], cfg["num_attention_heads"]) == (48, 16, 4)
    assert math.isclose(cfg["rms_norm_eps"], 1e-5 * 64 / 48)
    ours = _write_and_reload(pm, ckpt, tmp_path / "out")
    assert ours.model.layers[0].self_attn.q_proj.weight.shape == (64, 48)
    torch.testing.assert_close(_logits(ours), _logits(model), rtol=1e-5, atol=1e-5)


# -- the GQA rule ----------------------------------------------------------------------------


def test_gqa_rule_keeps_heads_divisible_by_kv_heads() -> None:
    assert gqa_shape(9, 3, 0.33) == (3, 2)  # one query head from every group
    assert gqa_shape(9, 3, 2 / 3) == (3, 1)
    assert gqa_shape(9, 3, 0.5) == (2, 2)  # 5 go (halves up): one group, then one per group
    assert gqa_shape(4, 4, 0.5) == (2, 1)  # MHA stays MHA
    for heads, kv in [(9, 3), (8, 2), (12, 4), (4, 2), (6, 6), (32, 8)]:
        ok = 0
        for step in range(1, 100):
            try:
                g, q = gqa_shape(heads, kv, step / 100)
            except UsageError as exc:
                assert "Achievable" in exc.hint or "removes" in exc.message or "none" in exc.message
                continue
            ok += 1
            assert 1 <= g <= kv and 1 <= q <= heads // kv and g * q < heads
            assert (g * q) % g == 0
        assert ok > 0
    with pytest.raises(UsageError, match="cannot share evenly") as err:
        gqa_shape(9, 3, 0.25)  # 2 go, 7 stay
    assert "--ratio 0.333 (6 heads)" in err.value.hint


def test_head_and_hidden_counts_stay_loadable_by_transformers() -> None:
    """transformers 5 refuses hidden_size % num_attention_heads != 0 even with head_dim set."""
    from transformers import LlamaConfig

    with pytest.raises(Exception, match="not a multiple of the number of attention heads"):
        LlamaConfig(hidden_size=64, num_attention_heads=3, num_key_value_heads=3, head_dim=16)
    assert gqa_shape(32, 8, 0.5, hidden=4096) == (8, 2)
    with pytest.raises(UsageError, match="multiple of the head count") as err:
        gqa_shape(32, 32, 0.25, hidden=4096)  # 24 heads do not divide 4096
    assert err.value.hint.startswith("Achievable: --ratio 0.5 (16 heads)")
    assert hidden_kept(64, 0.25, 4) == 48
    assert hidden_kept(576, 0.1, 9) == 522  # 518.4 wanted: the nearest multiple of 9 heads
    assert hidden_kept(576, 0.1, 1) == 518
    with pytest.raises(UsageError, match="removing none"):
        hidden_kept(576, 0.005, 9)


# -- depth -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cllm.testing.tiny import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny4") / "tiny4", num_hidden_layers=4)


def _layer_states(folder: Path, ids: torch.Tensor) -> list[torch.Tensor]:
    """h_0 .. h_L (each layer's input, then the last output before the final norm), taken
    from the full transformers model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    states: list[torch.Tensor] = []

    def grab(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        states.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    handles = [
        layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in model.model.layers
    ]
    last = model.model.norm.register_forward_pre_hook(lambda _m, a: states.append(a[0].clone()))
    _logits(model, ids)
    for h in [*handles, last]:
        h.remove()
    return [s.reshape(-1, s.shape[-1]) for s in states]


def _kept_layers_model(folder: Path, kept: list[int]) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in kept])
    for j, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = j
    model.config.num_hidden_layers = len(kept)
    return model


@pytest.mark.parametrize("metric", ["block-influence", "angular-distance"])
def test_depth_metric_matches_a_direct_computation_and_output_loads(
    tiny4: Path, calib: Any, metric: str, tmp_path: Path
) -> None:
    ckpt, pm = _prune(tiny4, DepthConfig(drop_layers=2, metric=metric, compute_dtype="fp32"), calib)
    h = _layer_states(tiny4, calib.ids)
    cos = torch.nn.functional.cosine_similarity
    if metric == "block-influence":
        want = [float(1 - cos(h[i], h[i + 1], dim=-1).mean()) for i in range(4)]
        got = pm.report["block_influence"]
        assert pm.report["dropped_layers"] == sorted(sorted(range(4), key=lambda i: want[i])[:2])
        tol = 1e-5
    else:
        want = [
            float((torch.arccos(cos(h[i], h[i + 2], dim=-1).clamp(-1, 1)) / math.pi).mean())
            for i in range(3)
        ]
        got = pm.report["angular_distance"]
        best = min(range(3), key=lambda i: want[i])
        assert pm.report["dropped_layers"] == [best, best + 1]
        tol = 2e-3  # the fp16 unit vectors the metric keeps
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert abs(g - w) <= tol, (got, want)
    kept = pm.report["kept_layers"]
    assert pm.config["num_hidden_layers"] == 2 and len(kept) == 2
    assert {p.name.split(".")[2] for p in pm.plans if p.name.startswith("model.layers.")} == {
        "0",
        "1",
    }
    ours = _write_and_reload(pm, ckpt, tmp_path / "out")
    torch.testing.assert_close(
        _logits(ours), _logits(_kept_layers_model(tiny4, kept)), rtol=0, atol=1e-6
    )


def test_depth_last_renumbers_and_trims_per_layer_config(tiny4: Path, tmp_path: Path) -> None:
    ckpt = open_checkpoint(tiny4)
    ckpt.config["layer_types"] = ["a", "b", "c", "d"]  # as configs with per-layer arrays have
    pm = prune_depth(ckpt, DepthConfig(drop_layers=1, metric="last"), PruneContext())
    assert pm.report["dropped_layers"] == [3] and pm.config["layer_types"] == ["a", "b", "c"]
    ckpt.config.pop("layer_types")
    pm = prune_depth(ckpt, DepthConfig(drop_layers=3, metric="last"), PruneContext())
    ours = _write_and_reload(pm, ckpt, tmp_path / "out")
    torch.testing.assert_close(
        _logits(ours), _logits(_kept_layers_model(tiny4, [0])), rtol=0, atol=1e-6
    )


# -- bad inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        StructuredConfig(ratio=0.0),
        StructuredConfig(ratio=1.0),
        StructuredConfig(ratio=1.5),
        StructuredConfig(ratio=-0.1),
        StructuredConfig(ratio=float("nan")),
        StructuredConfig(target="layers"),
        DepthConfig(drop_layers=0),
        DepthConfig(metric="cosine"),
    ],
)
def test_bad_configs_are_usage_errors(cfg: Any) -> None:
    with pytest.raises(UsageError) as err:
        cfg.validate()
    assert err.value.hint


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (StructuredConfig(target="heads", ratio=0.9), "removes all"),  # 4 of 4 heads
        (StructuredConfig(target="mlp", ratio=0.001), "rounds to removing none"),
        (StructuredConfig(target="hidden", ratio=0.999), "removes all"),
        (DepthConfig(drop_layers=2, metric="last"), "leaves no layer"),
    ],
)
def test_bad_ratios_for_the_model_are_usage_errors(tiny_model: Path, cfg: Any, match: str) -> None:
    ckpt = open_checkpoint(tiny_model)
    handler = prune_depth if isinstance(cfg, DepthConfig) else prune_structured
    with pytest.raises(UsageError, match=match):
        handler(ckpt, cfg, PruneContext())  # refused before any calibration is loaded


def test_ratio_that_breaks_gqa_grouping_is_a_usage_error(tmp_path: Path) -> None:
    src = _save(_tiny(hidden_size=96, num_attention_heads=6, num_key_value_heads=3), tmp_path / "m")
    with pytest.raises(UsageError, match="cannot share evenly"):
        prune_structured(
            open_checkpoint(src), StructuredConfig(target="heads", ratio=1 / 6), PruneContext()
        )


def test_quantized_input_needs_dequantize(tiny_model: Path, tmp_path: Path, calib: Any) -> None:
    from cllm.core.export import GGUFExportConfig, export

    gguf = tmp_path / "tiny.q8.gguf"
    export(open_checkpoint(tiny_model), GGUFExportConfig("Q8_0"), gguf, PROV)
    ckpt = open_checkpoint(gguf)
    for cfg in (StructuredConfig(target="mlp", ratio=0.25), DepthConfig(metric="last")):
        with pytest.raises(UsageError, match="quantized") as err:
            prune(ckpt, cfg, PruneContext(calibration=calib))
        assert "--dequantize" in err.value.hint
    pm = prune(
        ckpt,
        StructuredConfig(target="mlp", ratio=0.25, dequantize=True),
        PruneContext(calibration=calib),
    )
    assert {p.dtype for p in pm.plans} == {"F32"} and "quantization_config" not in pm.config
    _write_and_reload(pm, ckpt, tmp_path / "out")


# -- deployment (slow): GGUF in llama.cpp, ONNX in onnxruntime ------------------------------------


def _deploy_targets(tmp: Path, calib: Any) -> dict[str, tuple[Path, Any]]:
    """Pruned tiny outputs written as HF folders: name -> (folder, transformers model)."""
    from cllm.testing.tiny import save_tiny_llama

    src = save_tiny_llama(tmp / "src", num_hidden_layers=3)
    out = {}
    for name, cfg in {
        "hidden": StructuredConfig(target="hidden", ratio=0.25, compute_dtype="fp32"),
        "heads": StructuredConfig(target="heads", ratio=0.5, compute_dtype="fp32"),
        "mlp": StructuredConfig(target="mlp", ratio=0.5, compute_dtype="fp32"),
        "depth": DepthConfig(drop_layers=1, metric="block-influence", compute_dtype="fp32"),
    }.items():
        ckpt, pm = _prune(src, cfg, calib)
        folder = tmp / name
        out[name] = (folder, _write_and_reload(pm, ckpt, folder))
    return out


@pytest.mark.slow
def test_pruned_outputs_export_to_gguf_and_run_in_llama_cpp(tmp_path: Path, calib: Any) -> None:
    pytest.importorskip("llama_cpp")
    import numpy as np

    from cllm.core.export import GGUFExportConfig, export
    from cllm.standalone.guard import load_llama

    for name, (folder, model) in _deploy_targets(tmp_path, calib).items():
        gguf = tmp_path / f"{name}.gguf"
        export(open_checkpoint(folder), GGUFExportConfig("F32"), gguf, PROV)
        llm = load_llama(str(gguf), n_ctx=64, logits_all=True, verbose=False)
        try:
            llm.eval(IDS[0].tolist())
            got = np.asarray(llm.scores[: IDS.shape[1]])
        finally:
            llm.close()
        want = _logits(model)[0].numpy()
        scale = float(np.abs(want).max())
        assert float(np.abs(got - want).max()) <= 1e-3 * scale, name


@pytest.mark.slow
def test_pruned_outputs_export_to_onnx_and_run_in_onnxruntime(tmp_path: Path, calib: Any) -> None:
    pytest.importorskip("onnxruntime_genai")
    import numpy as np

    from cllm.core.export import OnnxExportConfig, export
    from cllm.formats.onnx_io import check_graph, open_decoder

    for name, (folder, model) in _deploy_targets(tmp_path, calib).items():
        onnx_dir = tmp_path / f"{name}.onnx"
        export(open_checkpoint(folder), OnnxExportConfig(), onnx_dir, PROV)
        check_graph(onnx_dir)
        got = open_decoder(onnx_dir).logits(IDS[0].numpy())[0]
        want = _logits(model)[0].numpy()
        scale = float(np.abs(want).max())
        assert float(np.abs(got - want).max()) <= 1e-3 * scale, name
