"""cllm quantize on the real SmolLM2-135M (slow): GPTQ beats RTN, and llama.cpp runs what we write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow

CALIB = ["--calib-samples", "16", "--calib-seqlen", "256"]


def _kld(path: Path, backend: str = "torch", chunks: str = "4") -> float:
    p = run_cli(
        "eval",
        str(path),
        "-b",
        backend,
        "--chunks",
        chunks,
        "--kld-base",
        "smollm2-135m",
        "--json",
        check=True,
    )
    return json.loads(p.stdout)["kld"]["mean"]


@pytest.mark.parametrize("bits,group", [("4", "128"), ("3", "64")])
def test_gptq_beats_rtn(smollm2: Path, tmp_path: Path, bits: str, group: str) -> None:
    common = ["--bits", bits, "--group-size", group]
    rtn = run_cli(
        "quantize", "smollm2-135m", *common, "-o", str(tmp_path / "rtn"), check=True
    ).stdout.strip()
    gptq = run_cli(
        "quantize",
        "smollm2-135m",
        "--method",
        "gptq",
        *common,
        *CALIB,
        "-o",
        str(tmp_path / "gptq"),
        check=True,
    ).stdout.strip()
    k_rtn, k_gptq = _kld(Path(rtn)), _kld(Path(gptq))
    assert k_gptq < k_rtn, (k_gptq, k_rtn)


@pytest.mark.parametrize("gtype", ["Q4_0", "Q5_1"])
def test_gptq_gguf_grids_run_in_llamacpp(smollm2: Path, tmp_path: Path, gtype: str) -> None:
    out = run_cli(
        "quantize",
        "smollm2-135m",
        "--method",
        "gptq",
        "--gguf-type",
        gtype,
        *CALIB,
        "-o",
        str(tmp_path / "g.gguf"),
        check=True,
    ).stdout.strip()
    info = json.loads(run_cli("info", out, "--json", "--no-sparsity", check=True).stdout)
    assert info["types"][gtype]["tensors"] == 210  # every Linear of the 30 layers
    assert info["types"]["Q8_0"]["tensors"] == 1  # the tied embedding, as llama.cpp keeps it
    assert _kld(Path(out), "llama.cpp", "2") < 0.5


@pytest.mark.parametrize("gtype", ["Q4_K_M", "Q6_K", "Q3_K_M", "IQ4_NL", "Q2_K"])
def test_llamacpp_types_load(smollm2: Path, tmp_path: Path, gtype: str) -> None:
    out = run_cli(
        "quantize", "smollm2-135m", "--gguf-type", gtype, "-o", str(tmp_path / "k.gguf"), check=True
    ).stdout.strip()
    p = run_cli("eval", out, "-b", "llama.cpp", "--chunks", "1", "--json", check=True)
    assert json.loads(p.stdout)["perplexity"] < 200


def test_imatrix_lowers_the_kld_of_llamacpp_q4_k_m(smollm2: Path, tmp_path: Path) -> None:
    """The importance matrix is what weights llama.cpp's K-quant scale search by the
    calibration activations: the same type with it must be closer to the base."""
    files = {}
    for name, extra in (("plain", []), ("imatrix", ["--imatrix", "auto", *CALIB])):
        files[name] = run_cli(
            "quantize", "smollm2-135m", "--gguf-type", "Q4_K_M", *extra,
            "-o", str(tmp_path / f"{name}.gguf"), check=True,
        ).stdout.strip()  # fmt: skip
    plain, weighted = (_kld(Path(files[n]), "llama.cpp") for n in ("plain", "imatrix"))
    assert weighted < 0.9 * plain, (weighted, plain)
