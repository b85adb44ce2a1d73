"""Integration on the real SmolLM2-135M (the base is its Q4_1 GGUF, dequantized)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cllm.formats.checkpoint import open_checkpoint
from tests.conftest import run_cli

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is Paris. The capital of Germany is"


@pytest.fixture(scope="module")
def exported(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("smol")
    files = {}
    for t in ("F32", "Q8_0", "Q4_0", "Q4_1"):
        p = run_cli(
            "export",
            "smollm2-135m",
            "--to",
            "gguf",
            "--gguf-type",
            t,
            "-o",
            str(out / f"smol.{t}.gguf"),
            check=True,
        )
        files[t] = Path(p.stdout.strip())
    return files


def test_alias_conversion_matches_transformers_gguf_loader(smollm2: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cllm.formats.aliases import source_path

    src = source_path("smollm2-135m")
    ours = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    theirs = AutoModelForCausalLM.from_pretrained(
        src.parent, gguf_file=src.name, dtype=torch.float32
    ).eval()
    ids = AutoTokenizer.from_pretrained(smollm2)(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert torch.equal(a, b)
    info = json.loads(run_cli("info", "smollm2-135m", "--json", "--no-sparsity", check=True).stdout)
    assert info["params"] == 134_515_008 and info["layers"] == 30 and info["hidden_size"] == 576


def test_every_written_type_loads_in_llamacpp_and_kld_orders(
    exported: dict[str, Path], wiki_text: Path
) -> None:
    base = run_cli("eval", "smollm2-135m", "--chunks", "2", "--json", check=True)
    base_ppl = json.loads(base.stdout)["perplexity"]
    res = {}
    for t, path in exported.items():
        p = run_cli(
            "eval",
            str(path),
            "-b",
            "llama.cpp",
            "--chunks",
            "2",
            "--kld-base",
            "smollm2-135m",
            "--json",
            check=True,
        )
        res[t] = json.loads(p.stdout)
    # the same F32 weights through torch and through llama.cpp: within 1%
    assert res["F32"]["perplexity"] == pytest.approx(base_ppl, rel=0.01)
    assert res["F32"]["kld"]["mean"] < 1e-3 and res["F32"]["kld"]["top1_agreement"] > 0.99
    assert res["F32"]["kld"]["mean"] < res["Q8_0"]["kld"]["mean"] < res["Q4_0"]["kld"]["mean"]
    assert res["Q8_0"]["kld"]["mean"] < 0.02
    for t, r in res.items():
        assert np.isfinite(r["perplexity"]), t


def test_greedy_tokens_match_between_torch_and_llamacpp(
    smollm2: Path, exported: dict[str, Path]
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cllm.core.eval.backends import LlamaCppBackend

    tok = AutoTokenizer.from_pretrained(smollm2)
    ids = tok(PROMPT).input_ids
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[
            0, len(ids) :
        ].tolist()
    backend = LlamaCppBackend(exported["F32"], ctx=128, threads=2)
    seq = list(ids)
    try:
        for _ in range(16):
            seq.append(int(backend.logits(np.array(seq))[-1].argmax()))
    finally:
        backend.close()
    assert seq[len(ids) :] == ref
    assert "Berlin" in tok.decode(ref)


def test_roundtrip_gguf_to_safetensors_to_gguf_on_real_model(
    exported: dict[str, Path], tmp_path: Path
) -> None:
    st = tmp_path / "smol.safetensors"
    run_cli(
        "export",
        str(exported["Q8_0"]),
        "--to",
        "safetensors",
        "--single-file",
        "-o",
        str(st),
        check=True,
    )
    ckpt = open_checkpoint(st)
    q8 = open_checkpoint(exported["Q8_0"])
    name = "model.layers.3.self_attn.k_proj.weight"
    assert torch.equal(ckpt.get(name), q8.get(name))
    again = tmp_path / "again.gguf"
    run_cli("export", str(st), "--to", "gguf", "--gguf-type", "Q8_0", "-o", str(again), check=True)
    # re-quantizing already-Q8_0 values onto the same grid reproduces them
    assert torch.allclose(open_checkpoint(again).get(name), q8.get(name), atol=1e-6)
