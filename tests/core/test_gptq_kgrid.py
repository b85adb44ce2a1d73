"""GPTQ on llama.cpp's K grids: with no error to feed back it writes exactly the blocks
llama.cpp's reference quantizer writes; with calibration it follows llama.cpp's type mix,
and the file runs in llama.cpp."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cllm.core.quantize.gptq import gptq_quantize
from cllm.core.quantize.grid import KGrid
from cllm.formats.checkpoint import open_checkpoint
from cllm.formats.kquants import quantize_rows
from tests.conftest import cli_in_process


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_without_feedback_gptq_writes_the_reference_blocks(qtype: str) -> None:
    """A diagonal Hessian feeds no error forward: every column rounds on the block
    parameters fitted to the original weights, which is the reference's final pass."""
    torch.manual_seed(0)
    W = torch.randn(24, 512) * 0.02
    res = gptq_quantize(W.clone(), torch.eye(512), KGrid(qtype), damp=0.01)
    assert res.raw is not None
    np.testing.assert_array_equal(res.raw.numpy(), quantize_rows(qtype, W))


def test_gptq_q4_k_m_follows_llama_cpp_and_runs(wide_model: Path, tmp_path: Path) -> None:
    from gguf import GGUFReader

    from cllm.testing.tiny import tiny_text

    text = tmp_path / "calib.txt"
    text.write_text(tiny_text(3000))
    out = tmp_path / "gptq.gguf"
    p = cli_in_process("quantize", str(wide_model), "--method", "gptq", "--gguf-type", "Q4_K_M",
                       "--calib", str(text), "--calib-samples", "8", "--calib-seqlen", "32",
                       "-o", str(out))  # fmt: skip
    assert p.returncode == 0, p.stderr
    ref = tmp_path / "llama.gguf"
    p = cli_in_process("quantize", str(wide_model), "--gguf-type", "Q4_K_M", "-o", str(ref))
    assert p.returncode == 0, p.stderr
    ours = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    theirs = {t.name: t.tensor_type.name for t in GGUFReader(ref).tensors}
    assert ours == theirs
    # through cllm's llama.cpp worker, which survives llama.cpp's AMX crash on Intel CPUs
    # by loading again without the extra buffer types (a bare Llama() segfaults there)
    from cllm.core.eval.backends import LlamaCppBackend

    backend = LlamaCppBackend(out, ctx=32, threads=2)
    try:
        assert np.isfinite(backend.logits(np.array([1, 5, 9, 12]))).all()
    finally:
        backend.close()
    # cllm reads its own K blocks back (gguf-py's dequantizer) close to the float weights
    src, q = open_checkpoint(wide_model), open_checkpoint(out)
    w = src.get("model.layers.0.mlp.down_proj.weight")
    err = (q.get("model.layers.0.mlp.down_proj.weight") - w).pow(2).mean().sqrt() / w.pow(
        2
    ).mean().sqrt()
    assert float(err) < 0.15
