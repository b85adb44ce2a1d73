"""cllm's restatement of llama.cpp's K-mix type choices against llama.cpp itself, on tiny
models whose widths exercise the rules: rows of 256 (K types apply), of 64 and 96 (every
fallback), grouped-query attention at 4 (the Q2_K attn_v rule), tied and untied output."""

from __future__ import annotations

from pathlib import Path

import pytest

from cllm.formats.checkpoint import open_checkpoint
from cllm.formats.kmix import K_MIXES, mix_types
from cllm.formats.provenance import make_provenance
from cllm.formats.save import save_gguf

SHAPES = {
    "wide-gqa4": dict(hidden_size=256, intermediate_size=768, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=9),
    "narrow-untied": dict(hidden_size=96, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=5, tie_word_embeddings=False),
}  # fmt: skip


@pytest.fixture(scope="module", params=list(SHAPES))
def f32_model(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict]:
    from cllm.testing.tiny import save_tiny_llama

    cfg = SHAPES[request.param]
    folder = save_tiny_llama(tmp_path_factory.mktemp(request.param) / "m", **cfg)
    out = folder.parent / "m.F32.gguf"
    save_gguf(out, open_checkpoint(folder), "F32", make_provenance("t", {}, None, None))
    return out, cfg


@pytest.mark.parametrize("ftype", list(K_MIXES))
def test_mix_matches_llama_cpp(f32_model: tuple[Path, dict], ftype: str, tmp_path: Path) -> None:
    import llama_cpp
    from gguf import GGUFReader

    f32, cfg = f32_model
    out = tmp_path / "q.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), params) == 0
    theirs = {
        t.name: t.tensor_type.name
        for t in GGUFReader(out).tensors
        if len(t.shape) >= 2 and t.shape[1] > 1
    }
    shapes = [
        (t.name, tuple(int(d) for d in t.shape))
        for t in GGUFReader(f32).tensors
        if len(t.shape) >= 2 and t.shape[1] > 1
    ]
    ours = mix_types(
        ftype,
        shapes,
        cfg["num_hidden_layers"],
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
    )
    assert ours == theirs
