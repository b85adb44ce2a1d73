"""The pinned perplexity/KLD protocol on a tiny real model, both backends."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cllm.core.eval.backends import TorchBackend
from cllm.core.eval.data import load_tokens, make_chunks
from cllm.core.eval.perplexity import BaseLogprobCache, EvalConfig, evaluate
from cllm.core.eval.run import run_eval
from cllm.errors import InputError
from cllm.formats.checkpoint import open_checkpoint

CTX = 64


def test_chunks_are_non_overlapping_from_the_start() -> None:
    ids = np.arange(1000)
    chunks = make_chunks(ids, 64, None)
    assert len(chunks) == 15
    assert all(len(c) == 64 for c in chunks)
    assert np.array_equal(np.concatenate(chunks), ids[: 15 * 64])
    assert len(make_chunks(ids, 64, 3)) == 3
    with pytest.raises(InputError, match="more than"):
        make_chunks(ids, 64, 16)
    with pytest.raises(InputError, match="ctx"):
        make_chunks(ids, 63, 1)


def test_perplexity_matches_a_direct_computation(tiny_model: Path, tiny_text: Path) -> None:
    """Second half scored: positions ctx/2..ctx-2 predict tokens ctx/2+1..ctx-1."""
    ckpt = open_checkpoint(tiny_model)
    res = run_eval(ckpt, EvalConfig(text=str(tiny_text), ctx=CTX, chunks=3))
    assert res.protocol["tokens_scored"] == 3 * (CTX // 2 - 1)
    toks = load_tokens(tiny_text, ckpt.tokenizer_dir()).ids
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    nll = []
    for i in range(3):
        chunk = torch.as_tensor(toks[i * CTX : (i + 1) * CTX])[None]
        with torch.no_grad():
            lp = torch.log_softmax(model(chunk).logits[0].float(), -1)
        for j in range(CTX // 2, CTX - 1):
            nll.append(-float(lp[j, chunk[0, j + 1]]))
    want = math.exp(sum(nll) / len(nll))
    assert res.perplexity == pytest.approx(want, rel=2e-3)  # float16 rounding of log-probs
    arr = np.array(nll)
    se = math.exp(arr.mean()) * arr.std(ddof=1) / math.sqrt(len(arr))
    assert res.perplexity_se == pytest.approx(se, rel=2e-2)


def test_kld_of_a_model_against_itself_is_zero(tiny_model: Path, tiny_text: Path) -> None:
    ckpt = open_checkpoint(tiny_model)
    res = run_eval(
        ckpt, EvalConfig(text=str(tiny_text), ctx=CTX, chunks=4), kld_base=ckpt, use_cache=False
    )
    assert res.kld is not None
    assert res.kld.mean == 0.0
    assert res.kld.max == 0.0
    assert res.kld.top1_agreement == 1.0
    assert res.base_perplexity == pytest.approx(res.perplexity, rel=1e-9)


def test_torch_and_llamacpp_agree_on_f32(
    tiny_model: Path, tiny_ggufs: dict[str, Path], tiny_text: Path
) -> None:
    cfg = dict(text=str(tiny_text), ctx=CTX, chunks=8, threads=2)
    t = run_eval(open_checkpoint(tiny_model), EvalConfig(backend="torch", **cfg))
    g = run_eval(open_checkpoint(tiny_ggufs["F32"]), EvalConfig(backend="llama.cpp", **cfg))
    assert g.perplexity == pytest.approx(t.perplexity, rel=0.01)


def test_kld_orders_quantization_types(
    tiny_model: Path, tiny_ggufs: dict[str, Path], tiny_text: Path
) -> None:
    base = open_checkpoint(tiny_model)
    cfg = dict(text=str(tiny_text), ctx=CTX, chunks=6, threads=2, backend="llama.cpp")
    res = {
        t: run_eval(open_checkpoint(p), EvalConfig(**cfg), kld_base=base)
        for t, p in tiny_ggufs.items()
    }
    klds = {t: r.kld.mean for t, r in res.items() if r.kld is not None}
    assert klds["F32"] < klds["Q8_0"] < klds["Q4_0"]
    assert klds["F32"] < 1e-4
    assert res["F32"].kld is not None and res["F32"].kld.top1_agreement > 0.97
    assert res["Q4_0"].kld is not None and res["Q4_0"].kld.p99 >= res["Q4_0"].kld.median


def test_base_logprobs_are_cached_and_reused(
    tiny_model: Path, tiny_ggufs: dict[str, Path], tiny_text: Path
) -> None:
    base = open_checkpoint(tiny_model)
    model = open_checkpoint(tiny_ggufs["Q8_0"])
    cfg = EvalConfig(text=str(tiny_text), ctx=CTX, chunks=2, backend="torch")
    first = run_eval(model, cfg, kld_base=base)
    toks = load_tokens(tiny_text, base.tokenizer_dir())
    key = {
        "base_sha256": base.sha256,
        "base_backend": "torch",
        "text_sha256": toks.text_sha256,
        "tokenizer_sha256": toks.tokenizer_sha256,
        "ctx": CTX,
        "protocol": 1,
    }
    cache = BaseLogprobCache(key)
    assert cache.get(0) is not None and cache.get(1) is not None
    assert cache.get(0).dtype == np.float16
    # with every chunk cached the base model is never run: evaluate() works with no base backend
    chunks = make_chunks(toks.ids, CTX, 2)
    backend = TorchBackend(model)
    nll, kld, agree, _ = evaluate(backend, chunks, CTX, base=None, base_cache=cache)
    assert kld is not None and first.kld is not None
    assert float(kld.mean()) == pytest.approx(first.kld.mean, rel=1e-6)


def test_different_tokenizers_are_refused(
    tiny_model: Path, tiny_text: Path, smollm2_free_tmp: Path
) -> None:
    """KLD needs identical token streams; a base with another vocabulary is rejected up front."""
    from cllm.testing.tiny import save_tiny_llama

    other = save_tiny_llama(smollm2_free_tmp / "other", seed=1)
    spec = json.loads((other / "tokenizer.json").read_text())
    spec["model"]["merges"] = spec["model"]["merges"][:2]  # same vocabulary, fewer merges
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(InputError, match="tokenize the text differently"):
        run_eval(
            open_checkpoint(tiny_model),
            EvalConfig(text=str(tiny_text), ctx=CTX, chunks=1),
            kld_base=open_checkpoint(other),
        )


@pytest.fixture
def smollm2_free_tmp(tmp_path: Path) -> Path:
    return tmp_path
