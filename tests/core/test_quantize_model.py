"""Whole-model quantization on the tiny Llama: RTN and layer-by-layer GPTQ, outputs and resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cllm.core.calib import load_calibration
from cllm.core.quantize.api import Target, quantize, state_dir
from cllm.core.quantize.methods import GPTQConfig, RTNConfig
from cllm.errors import InputError, UsageError
from cllm.formats.checkpoint import open_checkpoint
from tests.conftest import kld_vs_base, quant_provenance


def test_calibration_windows_are_seeded(tiny_model: Path, tiny_text: Path, calib) -> None:  # noqa: ANN001
    tok = open_checkpoint(tiny_model).tokenizer_dir()
    again = load_calibration(tiny_text, tok, samples=16, seqlen=64, seed=0)
    other = load_calibration(tiny_text, tok, samples=16, seqlen=64, seed=1)
    assert calib.ids.shape == (16, 64)
    assert torch.equal(calib.ids, again.ids) and not torch.equal(calib.ids, other.ids)
    assert calib.to_provenance()["sha256"] == again.sha256
    with pytest.raises(InputError, match="fewer than"):
        load_calibration(tiny_text, tok, samples=10_000, seqlen=512, seed=0)


def test_bad_calibration_files(tiny_model: Path, tmp_path: Path) -> None:
    tok = open_checkpoint(tiny_model).tokenizer_dir()
    with pytest.raises(InputError, match="not found"):
        load_calibration(tmp_path / "missing.txt", tok, 4, 64, 0)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(InputError, match="empty"):
        load_calibration(tmp_path / "empty.txt", tok, 4, 64, 0)


def test_gptq_beats_rtn_onkld_vs_base(
    tiny_model: Path, tiny_text: Path, calib, tmp_path: Path
) -> None:  # noqa: ANN001
    ckpt = open_checkpoint(tiny_model)
    target = Target(to="safetensors", bits=3, group_size=32, fake=True)
    rtn_out, gptq_out = tmp_path / "rtn", tmp_path / "gptq"
    quantize(ckpt, RTNConfig(), target, rtn_out, quant_provenance({"m": "rtn"}))
    report = quantize(
        ckpt,
        GPTQConfig(calib_samples=16, calib_seqlen=64),
        target,
        gptq_out,
        quant_provenance({"m": "gptq"}),
        calibration=calib,
    )
    assert report["quantized_tensors"] == 14
    assert not state_dir(gptq_out).exists()  # state is removed once the output is written
    k_rtn = kld_vs_base(rtn_out, tiny_model, tiny_text)
    k_gptq = kld_vs_base(gptq_out, tiny_model, tiny_text)
    assert 0 < k_gptq < k_rtn
    # untouched tensors are copied exactly; quantized ones have at most 2^bits distinct values per group
    q = open_checkpoint(gptq_out)
    assert torch.equal(q.get("model.embed_tokens.weight"), ckpt.get("model.embed_tokens.weight"))
    w = q.get("model.layers.0.mlp.down_proj.weight")
    assert all(len(torch.unique(w[r, :32])) <= 8 for r in range(w.shape[0]))


def test_keep_leaves_tensors_unquantized(tiny_model: Path, tmp_path: Path) -> None:
    ckpt = open_checkpoint(tiny_model)
    out = tmp_path / "kept"
    report = quantize(
        ckpt,
        RTNConfig(),
        Target(bits=4, group_size=32, fake=True, keep=[r"mlp\.down_proj"]),
        out,
        quant_provenance({}),
    )
    assert report["quantized_tensors"] == 12
    q = open_checkpoint(out)
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(q.get(name), ckpt.get(name))
    assert not torch.equal(
        q.get("model.layers.1.mlp.up_proj.weight"), ckpt.get("model.layers.1.mlp.up_proj.weight")
    )
    with pytest.raises(UsageError, match="regular expression"):
        quantize(ckpt, RTNConfig(), Target(keep=["("]), tmp_path / "x", quant_provenance({}))


def test_packed_output_uses_a_group_size_loaders_accept(tiny_model: Path, tmp_path: Path) -> None:
    """Rows of 64 and 128: g256 cannot be loaded by compressed-tensors, so packed output says so
    and uses g64, the largest size dividing every row, while --fake keeps g256 semantics (one shorter group)."""
    ckpt = open_checkpoint(tiny_model)
    packed = quantize(
        ckpt, RTNConfig(), Target(bits=4, group_size=256), tmp_path / "p", quant_provenance({})
    )
    assert packed["group_size_used"] == 64 and "does not divide" in packed["note"]
    fake = quantize(
        ckpt,
        RTNConfig(),
        Target(bits=4, group_size=256, fake=True),
        tmp_path / "f",
        quant_provenance({}),
    )
    assert "note" not in fake
    a = open_checkpoint(tmp_path / "p").get("model.layers.0.mlp.up_proj.weight")
    b = open_checkpoint(tmp_path / "f").get("model.layers.0.mlp.up_proj.weight")
    assert torch.equal(a, b)  # a group wider than the row is the whole row either way


def test_gptq_resume_after_kill_gives_identical_bytes(
    tiny_model: Path, calib, tmp_path: Path
) -> None:  # noqa: ANN001
    ckpt = open_checkpoint(tiny_model)
    cfg = GPTQConfig(calib_samples=16, calib_seqlen=64)
    target = Target(to="gguf", gguf_type="Q4_0")
    prov = quant_provenance({"m": "gptq", "resume": True})
    clean = tmp_path / "clean.gguf"
    quantize(ckpt, cfg, target, clean, prov, calibration=calib)

    killed = tmp_path / "killed.gguf"

    def die(i: int, n: int) -> None:
        if i == 0:
            raise KeyboardInterrupt  # as if the process were killed after the first layer

    with pytest.raises(KeyboardInterrupt):
        quantize(ckpt, cfg, target, killed, prov, calibration=calib, on_layer=die)
    assert not killed.exists()
    assert (state_dir(killed) / "layer-0000.safetensors").exists()
    seen = []
    quantize(
        ckpt,
        cfg,
        target,
        killed,
        prov,
        calibration=calib,
        resume=True,
        on_layer=lambda i, n: seen.append(i),
    )
    assert seen == [1]  # only the second layer was redone
    assert killed.read_bytes() == clean.read_bytes()
