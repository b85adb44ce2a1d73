"""cllm's torch K-quant packer against llama.cpp's own reference quantizer: the same F32
tensors, quantized by both, must give the same bytes. The weights include the cases the
reference treats specially: all-zero rows, constant rows, tiny values below its 1e-15
threshold, a lone outlier, and integer values that put codes exactly on rounding ties."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cllm.formats.checkpoint import open_checkpoint
from cllm.formats.kquants import BLOCK_BYTES, quantize_rows
from cllm.formats.provenance import make_provenance
from cllm.formats.save import save_gguf

# llama.cpp file type whose "pure" mix puts every tensor in the K type
FTYPE = {"Q2_K": "Q2_K", "Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q6_K": "Q6_K"}


@pytest.fixture(scope="module")
def hard_f32(wide_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hard") / "m"
    folder.mkdir()
    for f in wide_model.iterdir():
        if f.name != "model.safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    tensors = load_file(wide_model / "model.safetensors")
    w = tensors["model.layers.0.mlp.down_proj.weight"].clone()  # [256, 512]
    w[0] = 0.0
    w[1] = 0.25
    w[2] = -0.125
    w[3, :] = 1e-20
    w[4, :] = 0.0
    w[4, 7] = 3.0
    w[5] = torch.randint(-8, 8, (512,)).float()
    w[6] = torch.randint(0, 4, (512,)).float() * 0.5
    w[7, :256] = 0.0
    tensors["model.layers.0.mlp.down_proj.weight"] = w
    tensors["model.layers.0.mlp.up_proj.weight"] *= 40.0  # larger magnitudes
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path_factory.mktemp("hard-gguf") / "hard.F32.gguf"
    save_gguf(out, open_checkpoint(folder), "F32", make_provenance("t", {}, None, None))
    return out


@pytest.mark.parametrize("qtype", list(FTYPE))
def test_packer_matches_llama_cpp_byte_for_byte(hard_f32: Path, tmp_path: Path, qtype: str) -> None:
    import llama_cpp
    from gguf import GGUFReader

    out = tmp_path / f"{qtype}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{FTYPE[qtype]}")
    params.pure = True
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(hard_f32).encode(), str(out).encode(), params) == 0
    src = {t.name: np.asarray(t.data) for t in GGUFReader(hard_f32).tensors}
    # every block-tensor of the type, quantized in one call (blocks are independent)
    wanted = [
        t
        for t in GGUFReader(out).tensors
        if t.tensor_type.name == qtype and t.name.startswith("blk.")
    ]
    blocks = torch.cat(
        [torch.from_numpy(src[t.name].astype(np.float32)).reshape(-1, 256) for t in wanted]
    )
    got_all = quantize_rows(qtype, blocks)
    mismatched = {}
    start = 0
    for t in wanted:
        want = np.asarray(t.data).reshape(-1, BLOCK_BYTES[qtype])
        got = got_all[start : start + want.shape[0]]
        start += want.shape[0]
        bad = np.argwhere(got != want)
        if bad.size:
            mismatched[t.name] = (len(bad), bad[:3].tolist())
    compared = len(wanted)
    assert compared >= 12, compared
    assert not mismatched, json.dumps(mismatched)
