"""Every supported family through the commands a user runs, end to end through the CLI:
quantize (RTN and GPTQ to Q4_0), prune (Wanda and structured MLP), export to ONNX, and eval
on the backend each output runs on. In-process (typer's runner) to keep the suite fast; the
subprocess contract tests cover stdout/stderr separation for one family elsewhere."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cllm.cli import app
from cllm.formats.checkpoint import open_checkpoint
from cllm.testing.tiny import FAMILIES, save_tiny_family

FAMILY_NAMES = list(FAMILIES)
CAL = ["--calib-samples", "4", "--calib-seqlen", "64", "--seed", "0"]


def cli(*args: str) -> dict:
    """One command in-process; its single NDJSON record."""
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, f"cllm {' '.join(args)}: {result.stderr}"
    lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cllm.testing.tiny import _CORPUS, tiny_text

    path = tmp_path_factory.mktemp("text") / "mixed.txt"
    path.write_text(tiny_text(1500) + "\n".join(_CORPUS[:7]) * 4)
    return path


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    name = request.param
    return name, save_tiny_family(tmp_path_factory.mktemp(name) / name, name, seed=2)


def _eval(model: Path, base: Path, text: Path, backend: str) -> dict:
    return cli("eval", str(model), "-b", backend, "--kld-base", str(base), "--base-backend",
               "torch", "--text", str(text), "--ctx", "64", "--chunks", "4", "--no-cache")  # fmt: skip


_ONNX: dict[Path, Path] = {}  # one export per tiny model, shared by the export and bench tests


def _onnx(model: Path) -> Path:
    if model not in _ONNX:
        out = model.parent / "m.onnx"
        _ONNX[model] = Path(cli("export", str(model), "--to", "onnx", "-o", str(out))["path"])
    return _ONNX[model]


def _linear_names(model: Path) -> list[str]:
    from cllm.core.quantize.methods import LINEAR_RE

    return [n for n in open_checkpoint(model).tensor_infos() if LINEAR_RE.search(n)]


@pytest.mark.parametrize(  # two families in the default suite (budget), every one in the slow
    "family",
    [f if f in ("llama", "gemma3") else pytest.param(f, marks=pytest.mark.slow)
     for f in FAMILY_NAMES],
    indirect=True,
)  # fmt: skip
def test_quantize_rtn_and_gptq_q4_0_run_in_llamacpp(
    family: tuple, text: Path, tmp_path: Path
) -> None:
    """Both methods write a GGUF of the family's llama.cpp architecture with every projection
    in Q4_0, llama.cpp runs it close to the float model, and GPTQ is no worse than RTN."""
    from cllm.formats.arch import spec_for_config, spec_for_gguf

    name, model = family
    spec = spec_for_config(open_checkpoint(model).config)
    linears = _linear_names(model)
    klds = {}
    for method in ("rtn", "gptq"):
        out = tmp_path / f"{method}.gguf"
        extra = ["--calib", str(text), *CAL] if method == "gptq" else []
        rec = cli("quantize", str(model), "--method", method, "--gguf-type", "Q4_0",
                  *extra, "-o", str(out))  # fmt: skip
        assert Path(rec["path"]) == out
        info = cli("info", str(out), "--no-sparsity")
        # Mistral is written as llama.cpp's `llama`, so its GGUF reads back as Llama
        assert info["family"] == spec_for_gguf(spec.gguf_arch).label and info["features"]
        types = {n: i.dtype for n, i in open_checkpoint(out).tensor_infos().items()}
        assert {types[n] for n in linears} == {"Q4_0"}, name
        res = _eval(out, model, text, "llama.cpp")
        klds[method] = res["kld"]["mean"]
        assert 0 < res["kld"]["mean"] < 0.05, (name, method, res["kld"])
    assert klds["gptq"] <= klds["rtn"] * 1.05, klds


def test_prune_wanda_zeroes_half_of_every_projection(
    family: tuple, text: Path, tmp_path: Path
) -> None:
    """Wanda reaches every projection of the family (fused ones included), row by row, and
    the pruned model still runs. (Whether Wanda beats magnitude is a property of trained
    weights; on random tiny models it is a coin toss, so it is measured on SmolLM2.)"""
    name, model = family
    out = Path(cli("prune", str(model), "--method", "wanda", "--sparsity", "0.5",
                   "--calib", str(text), *CAL, "-o", str(tmp_path / "wanda"))["path"])  # fmt: skip
    ckpt = open_checkpoint(out)
    for n in _linear_names(model):
        w = ckpt.get(n)
        zeros = (w == 0).float().mean(dim=1)  # Wanda compares weights within each output row
        assert float(zeros.min()) == float(zeros.max()) == 0.5, (name, n)
    info = cli("info", str(out))
    assert info["linear_sparsity"] == pytest.approx(0.5)
    kld = _eval(out, model, text, "torch")["kld"]["mean"]
    assert math.isfinite(kld) and 0 < kld < 1.0, (name, kld)


def test_prune_structured_mlp_runs_in_llamacpp(family: tuple, text: Path, tmp_path: Path) -> None:
    """A quarter of the FFN channels removed: a smaller standard config, which transformers
    and llama.cpp both run the same. Phi-3's fused gate/up is refused with one line."""
    name, model = family
    out = tmp_path / "mlp"
    args = ["prune", str(model), "--structured", "mlp", "--ratio", "0.25",
            "--calib", str(text), *CAL, "-o", str(out)]  # fmt: skip
    if name == "phi3":
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "fused" in lines[0], result.stderr
        assert not out.exists()
        return
    cli(*args)
    src, pruned = open_checkpoint(model).config, open_checkpoint(out).config
    assert pruned["intermediate_size"] == src["intermediate_size"] * 3 // 4
    gguf = Path(cli("export", str(out), "--to", "gguf", "--gguf-type", "F32",
                    "-o", str(tmp_path / "mlp.gguf"))["path"])  # fmt: skip
    same = _eval(gguf, out, text, "llama.cpp")  # the pruned model, torch vs llama.cpp
    assert same["kld"]["mean"] < 1e-4 and same["kld"]["top1_agreement"] == 1.0, same["kld"]
    vs_base = _eval(out, model, text, "torch")
    assert 0 < vs_base["kld"]["mean"] < 1.0, vs_base["kld"]


# the builder takes ~12 s a model: every family in the slow suite (CI runs it); the default
# suite exports the tiny Llama to ONNX in tests/core/test_eval_compare.py
@pytest.mark.parametrize(
    "family",
    [pytest.param(f, marks=pytest.mark.slow) for f in FAMILY_NAMES],
    indirect=True,
)
def test_export_onnx_runs_in_onnxruntime(family: tuple, text: Path, tmp_path: Path) -> None:
    """onnxruntime-genai's builder exports the family; onnxruntime runs it as torch does,
    and generating with the KV cache past Gemma's sliding window equals recomputing."""
    from cllm.formats.onnx_io import open_decoder

    name, model = family
    out = _onnx(model)
    res = _eval(out, model, text, "onnxruntime")
    assert res["kld"]["mean"] < 1e-4 and res["kld"]["top1_agreement"] == 1.0, (name, res["kld"])
    dec = open_decoder(out)
    prompt = [5, 9, 14, 3, 7, 11]
    assert dec.greedy(prompt, 16, use_cache=True) == dec.greedy(prompt, 16, use_cache=False)
    # task scoring reuses each question's prefix cache: the same answers as torch
    tasks = ["--tasks", "arc_easy,winogrande", "--limit", "6"]
    onnx = cli("eval", str(out), *tasks)["tasks"]
    ref = cli("eval", str(model), "-b", "torch", *tasks)["tasks"]
    assert {t: r["acc"] for t, r in onnx.items()} == {t: r["acc"] for t, r in ref.items()}


def test_awq_folds_its_scales_exactly(family: tuple, text: Path, tmp_path: Path) -> None:
    """AWQ divides norm weights (Gemma's 1 + w ones included) and earlier projections by the
    scales it multiplies into the next weights. At Q8_0 the grid hides almost nothing, so a
    fold that changed the function would show far above Q8_0's own error."""
    name, model = family
    out = tmp_path / "awq.gguf"
    cli("quantize", str(model), "--method", "awq", "--gguf-type", "Q8_0", "--calib", str(text),
        *CAL, "-o", str(out))  # fmt: skip
    awq = _eval(out, model, text, "llama.cpp")["kld"]["mean"]
    assert awq < 1e-3, (name, awq)


@pytest.mark.slow  # three benchmark children a family
def test_bench_runs_every_backend(family: tuple, tmp_path: Path) -> None:
    """torch on the HF folder, llama.cpp on a Q4_0 GGUF, onnxruntime on the ONNX export:
    one record each, with the family's real prompt and generation speeds."""
    name, model = family
    gguf = tmp_path / "q.gguf"
    cli("quantize", str(model), "--gguf-type", "Q4_0", "-o", str(gguf))
    result = CliRunner().invoke(app, ["bench", str(model), str(gguf), str(_onnx(model)),
                                      "--prompt", "16", "--gen", "8", "--repeat", "1", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    records = [json.loads(ln) for ln in result.stdout.splitlines() if ln.strip()]
    assert [r["backend"] for r in records] == ["torch", "llama.cpp", "onnxruntime"], name
    for r in records:
        assert r["tg_tps"]["median"] > 0 and r["pp_tps"]["median"] > 0, (name, r)


@pytest.mark.slow  # a sensitivity map per family
def test_mixed_precision_meets_its_budget(family: tuple, text: Path, tmp_path: Path) -> None:
    """--target-bpw measures the family's sensitivity map (its own layer calls) and mixes
    GGUF types within the budget; llama.cpp runs the result."""
    name, model = family
    out = tmp_path / "mixed.gguf"
    cli("quantize", str(model), "--target-bpw", "5", "--calib", str(text), *CAL,
        "--sensitivity-chunks", "1", "-o", str(out))  # fmt: skip
    types = {i.dtype for i in open_checkpoint(out).tensor_infos().values()}
    assert {"Q4_0", "Q5_0"} <= types, (name, types)
    assert 0 < _eval(out, model, text, "llama.cpp")["kld"]["mean"] < 0.05


def test_drop_layers_keeps_a_runnable_model(family: tuple, text: Path, tmp_path: Path) -> None:
    """One decoder layer removed (Phi-3's fused projections do not matter here): a smaller
    standard config that llama.cpp runs as torch does. For Gemma 3, dropping the last layer
    keeps llama.cpp's fixed one-in-six pattern of global layers; a layer list off that
    pattern is refused for GGUF with one line."""
    name, model = family
    out = tmp_path / "short"
    cli("prune", str(model), "--drop-layers", "1", "--layer-metric", "last", "-o", str(out))
    n = open_checkpoint(model).config["num_hidden_layers"]
    assert open_checkpoint(out).config["num_hidden_layers"] == n - 1
    gguf = tmp_path / "short.gguf"
    cli("export", str(out), "--to", "gguf", "--gguf-type", "F32", "-o", str(gguf))
    same = _eval(gguf, out, text, "llama.cpp")
    assert same["kld"]["mean"] < 1e-4, (name, same["kld"])
    if name == "gemma3":  # as if a middle layer had been dropped: the global one moves up
        cfg_file = out / "config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg["layer_types"] = ["sliding_attention"] * 4 + ["full_attention"]
        cfg_file.write_text(json.dumps(cfg))
        bad = tmp_path / "off-pattern.gguf"
        result = CliRunner().invoke(app, ["export", str(out), "--to", "gguf", "-o", str(bad)])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and "layer" in lines[0], result.stderr
        assert not bad.exists()
