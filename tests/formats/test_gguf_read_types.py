"""Reading GGUF types cllm does not write itself: K-quants and IQ types made by llama.cpp's quantizer,
plus HF folders split into several shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cllm.formats.checkpoint import open_checkpoint
from cllm.formats.provenance import make_provenance
from cllm.formats.save import save_gguf

# type -> (llama.cpp ftype name, worst relative RMS error we accept on 256-wide random rows)
KTYPES = {"Q6_K": 0.03, "Q4_K": 0.12, "Q3_K": 0.25, "Q2_K": 0.45, "IQ4_NL": 0.12}
FTYPE = {"Q6_K": "Q6_K", "Q4_K": "Q4_K_M", "Q3_K": "Q3_K_M", "Q2_K": "Q2_K", "IQ4_NL": "IQ4_NL"}


@pytest.fixture(scope="module")
def f32_gguf(wide_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wide-gguf") / "wide.F32.gguf"
    save_gguf(out, open_checkpoint(wide_model), "F32", make_provenance("t", {}, None, None))
    return out


@pytest.mark.parametrize("qtype", list(KTYPES))
def test_reads_llamacpp_quant_types(
    wide_model: Path, f32_gguf: Path, qtype: str, tmp_path: Path
) -> None:
    import llama_cpp

    out = tmp_path / f"wide.{qtype}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{FTYPE[qtype]}")
    assert llama_cpp.llama_model_quantize(str(f32_gguf).encode(), str(out).encode(), params) == 0
    src = open_checkpoint(wide_model)
    ckpt = open_checkpoint(out)
    infos = ckpt.tensor_infos()
    assert any(i.dtype == qtype for i in infos.values()), {i.dtype for i in infos.values()}
    for name, info in infos.items():
        w = src.get(name)
        got = ckpt.get(name)
        assert got.shape == w.shape and got.dtype == torch.float32
        rel = float((got - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt())
        limit = KTYPES.get(info.dtype, 0.12)
        assert rel < limit, f"{name} ({info.dtype}): relative RMS error {rel:.3f}"


def test_reads_sharded_hf_folder(tmp_path: Path) -> None:
    from cllm.testing.tiny import tiny_llama, tiny_tokenizer

    model = tiny_llama(seed=3)
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").exists()
    assert len(list(folder.glob("*.safetensors"))) > 1
    ckpt = open_checkpoint(folder)
    state = model.state_dict()
    assert set(ckpt.tensor_infos()) == set(state)
    for name, tensor in state.items():
        assert torch.equal(ckpt.get(name), tensor), name
    assert len(ckpt.files()) == len(list(folder.glob("*.safetensors"))) + 1  # + config.json
    assert np.isfinite(ckpt.file_size)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_numpy_types_match_llamacpp_quantizer_bytes(
    wide_model: Path, f32_gguf: Path, qtype: str, tmp_path: Path
) -> None:
    """Golden bytes: cllm's writer and llama.cpp's own quantizer store identical blocks."""
    import llama_cpp
    from gguf import GGUFReader

    ours = tmp_path / f"ours.{qtype}.gguf"
    save_gguf(ours, open_checkpoint(wide_model), qtype, make_provenance("t", {}, None, None))
    theirs = tmp_path / f"theirs.{qtype}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    assert llama_cpp.llama_model_quantize(str(f32_gguf).encode(), str(theirs).encode(), params) == 0
    a = {t.name: t for t in GGUFReader(ours).tensors}
    b = {t.name: t for t in GGUFReader(theirs).tensors}
    compared = 0
    for name, tb in b.items():
        ta = a[name]
        if ta.tensor_type != tb.tensor_type:
            continue  # llama.cpp's recipes give some tensors (output, attn_v) more bits
        assert np.array_equal(np.asarray(ta.data), np.asarray(tb.data)), name
        compared += ta.tensor_type.name == qtype
    assert compared >= 8
