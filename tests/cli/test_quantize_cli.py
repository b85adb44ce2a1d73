"""`cllm quantize` end to end on the tiny model: outputs that existing loaders read, pipes, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cllm.formats.checkpoint import open_checkpoint
from tests.conftest import assert_transformers_matches_cllm, cli_in_process, run_cli


@pytest.mark.parametrize(
    "extra",
    [
        ["--bits", "4", "--group-size", "32"],
        ["--bits", "3", "--group-size", "-1"],
        ["--bits", "8", "--group-size", "64"],
    ],
)
def test_packed_output_loads_in_transformers_like_cllm_reads_it(
    tiny_model: Path, tmp_path: Path, extra: list[str]
) -> None:
    """The published layout check: transformers (compressed-tensors) and cllm's own reader agree exactly."""
    out = tmp_path / "q"
    p = run_cli("quantize", str(tiny_model), *extra, "-o", str(out))
    assert p.returncode == 0, p.stderr
    assert p.stdout == f"{out}\n"
    assert_transformers_matches_cllm(out)


def test_gptq_gguf_pipes_into_eval(tiny_model: Path, tiny_text: Path, tmp_path: Path) -> None:
    out = tmp_path / "g.gguf"
    q = run_cli(
        "quantize", str(tiny_model), "--method", "gptq", "--gguf-type", "Q4_0", "--calib", str(tiny_text),
        "--calib-samples", "8", "--calib-seqlen", "64", "-o", str(out), "--json",
    )  # fmt: skip
    assert q.returncode == 0, q.stderr
    rec = json.loads(q.stdout)
    assert rec["path"] == str(out) and rec["format"] == "gguf"
    assert (
        rec["params"]["method"]["method"] == "gptq"
        and len(rec["params"]["calibration_sha256"]) == 64
    )
    info = json.loads(run_cli("info", str(out), "--json", "--no-sparsity", check=True).stdout)
    assert info["types"]["Q4_0"]["tensors"] == 14
    assert info["provenance"][0]["calibration"]["samples"] == 8
    ev = run_cli(
        "eval",
        "-",
        "-b",
        "llama.cpp",
        "--text",
        str(tiny_text),
        "--ctx",
        "64",
        "--chunks",
        "2",
        "--kld-base",
        str(tiny_model),
        "--json",
        stdin=q.stdout,
    )
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["kld"]["mean"] > 0


def test_llamacpp_types_through_its_quantizer(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "k.gguf"
    p = run_cli("quantize", str(tiny_model), "--gguf-type", "q4_k_m", "-o", str(out))
    assert p.returncode == 0, p.stderr
    assert "tensor types" in p.stderr
    info = json.loads(run_cli("info", str(out), "--json", "--no-sparsity", check=True).stdout)
    assert info["provenance"][0]["op"] == "quantize"  # llama.cpp copied our provenance key
    assert set(info["types"]) - {"F32"}  # quantized tensors of some llama.cpp type


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--bits", "9"], "--bits 9"),
        (["--group-size", "48"], "--group-size 48"),
        (["--gguf-type", "Q9_9"], "unknown GGUF type"),
        (["--method", "awq", "--gguf-type", "Q4_K_M"], "cannot target Q4_K_M"),
        (["--method", "gptq", "--gguf-type", "IQ4_XS"], "cannot target IQ4_XS"),
        (["--method", "gptq", "--calib", "/nonexistent.txt"], "calibration file not found"),
        (["--method", "gptq", "--calib-samples", "100000"], "fewer than"),
        (["--act-order"], "apply to --method gptq"),
        (["--to", "gguf"], "needs --gguf-type"),
        (["--clip", "--gguf-type", "Q4_K_M"], "--clip cannot target Q4_K_M"),
        (["--method", "awq", "--clip"], "--clip applies to"),
    ],
)
def test_bad_quantize_arguments(
    tiny_model: Path, tiny_text: Path, tmp_path: Path, args: list[str], needle: str
) -> None:
    if "--method" in args and "--calib" not in args:
        args = [*args, "--calib", str(tiny_text)]
    out = tmp_path / "out"
    p = cli_in_process("quantize", str(tiny_model), *args, "-o", str(out))
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert lines[-1].startswith("cllm quantize: error:") and needle in lines[-1], p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_quantized_input_is_dequantized_with_a_warning(tiny_model: Path, tmp_path: Path) -> None:
    g = tmp_path / "a.gguf"
    run_cli(
        "export", str(tiny_model), "--to", "gguf", "--gguf-type", "Q8_0", "-o", str(g), check=True
    )
    p = run_cli(
        "quantize", str(g), "--bits", "4", "--group-size", "32", "--fake", "-o", str(tmp_path / "b")
    )
    assert p.returncode == 0, p.stderr
    assert "already quantized" in p.stderr
    prov = open_checkpoint(tmp_path / "b").provenance
    assert prov is not None and prov["params"]["input_dequantized_from"] == ["Q8_0"]


@pytest.mark.slow  # a sensitivity measurement and two mixed-precision runs (about 25 s)
def test_sensitivity_then_mixed_precision(
    tiny_model: Path, tiny_text: Path, tmp_path: Path
) -> None:
    sens = tmp_path / "sens.json"
    p = run_cli(
        "quantize",
        str(tiny_model),
        "--sensitivity",
        "--calib",
        str(tiny_text),
        "--sensitivity-chunks",
        "1",
        "-o",
        str(sens),
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [str(sens), str(sens.with_suffix(".png"))]
    data = json.loads(sens.read_text())
    assert data["candidates"] == ["Q4_0", "Q5_0", "Q8_0"] and len(data["kld"]) == 2
    assert sens.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

    mixed = tmp_path / "mixed.gguf"
    q = run_cli(
        "quantize",
        str(tiny_model),
        "--target-bpw",
        "5.0",
        "--sensitivity-file",
        str(sens),
        "-o",
        str(mixed),
    )
    assert q.returncode == 0, q.stderr
    info = json.loads(run_cli("info", str(mixed), "--json", "--no-sparsity", check=True).stdout)
    assert (
        info["types"]["Q4_0"]["tensors"] == 7 and info["types"]["Q5_0"]["tensors"] == 7
    )  # one layer each
    prov = info["provenance"][0]["params"]["mixed"]
    assert prov["bits_per_weight"] <= 5.0 and len(prov["sensitivity_sha256"]) == 64
    # the map rides in the provenance: the model's eval record carries it, the report draws it
    assert prov["sensitivity_map"]["kld"] == data["kld"]
    rec = run_cli("eval", str(mixed), "--text", str(tiny_text), "--ctx", "64", "--chunks", "1",
                  "--json", check=True).stdout  # fmt: skip
    assert json.loads(rec)["sensitivity"]["candidates"] == ["Q4_0", "Q5_0", "Q8_0"]
    (tmp_path / "rec.ndjson").write_text(rec)
    run_cli("report", str(tmp_path / "rec.ndjson"), "-o", str(tmp_path / "rep"), check=True)
    assert [p.name for p in (tmp_path / "rep").glob("heatmap-*.png")]

    # a file-size budget: the output must fit, GPTQ included (metadata is estimated from above,
    # so leave the tiny model some room beyond the mixed file's own size)
    budget = mixed.stat().st_size + 20_000
    sized = tmp_path / "sized.gguf"
    r = run_cli(
        "quantize", str(tiny_model), "--method", "gptq", "--target-size", str(budget), "--sensitivity-file", str(sens),
        "--calib", str(tiny_text), "--calib-samples", "8", "--calib-seqlen", "64", "-o", str(sized),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert sized.stat().st_size <= budget


def test_mixed_precision_bad_arguments(tiny_model: Path, tmp_path: Path) -> None:
    for args, needle in (
        (["--target-bpw", "5", "--target-size", "1MB"], "not both"),
        (["--target-bpw", "5", "--gguf-type", "Q4_0"], "per layer themselves"),
        (["--target-size", "lots"], "is not a size"),
        (
            ["--target-bpw", "3.0", "--sensitivity-file", str(tmp_path / "none.json")],
            "cannot read sensitivity file",
        ),
    ):
        p = cli_in_process("quantize", str(tiny_model), *args, "-o", str(tmp_path / "x.gguf"))
        assert p.returncode == 2, (args, p.stderr)
        assert needle in p.stderr.strip().splitlines()[-1]
        assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow  # three GPTQ runs, one killed (about 25 s); CI runs the slow tests
def test_killed_gptq_run_resumes_to_identical_bytes(
    tiny_model: Path, tiny_text: Path, tmp_path: Path
) -> None:
    args = [
        "quantize", str(tiny_model), "--method", "gptq", "--gguf-type", "Q4_0", "--calib", str(tiny_text),
        "--calib-samples", "8", "--calib-seqlen", "64",
    ]  # fmt: skip
    out = tmp_path / "r.gguf"
    killed = run_cli(*args, "-o", str(out), env={"CLLM_TEST_KILL_AFTER_LAYER": "0"})
    assert killed.returncode == -9  # SIGKILL, after layer 0 was saved
    assert not out.exists()
    state = tmp_path / ".r.gguf.cllm-state"
    assert (state / "layer-0000.safetensors").exists() and not (
        state / "layer-0001.safetensors"
    ).exists()
    resumed = run_cli(*args, "-o", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert not state.exists()
    again = tmp_path / "again.gguf"
    run_cli(*args, "-o", str(again), check=True)
    # the same tensors as an uninterrupted run; and the same bytes apart from the provenance key,
    # which the resumed run took over from the killed one (its start time and command)
    from gguf import GGUFReader

    a, b = GGUFReader(out), GGUFReader(again)
    for ta, tb in zip(a.tensors, b.tensors, strict=True):
        assert ta.name == tb.name and bytes(ta.data) == bytes(tb.data), ta.name
    prov = open_checkpoint(out).provenance
    assert prov is not None and prov["id"] == open_checkpoint(again).provenance["id"]


def test_architecture_llamacpp_cannot_take(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from cllm.testing.tiny import tiny_tokenizer

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=264, n_positions=128)
    ).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    out = tmp_path / "g.gguf"
    p = run_cli("quantize", str(folder), "--gguf-type", "Q8_0", "-o", str(out))
    assert p.returncode == 2, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert "model type 'gpt2' is not supported" in last and "Supported: llama" in last
    assert not out.exists()


def test_rtn_clip_writes_a_standard_gguf_closer_to_the_weights(
    tiny_model: Path, tmp_path: Path
) -> None:
    """--clip changes only which fp16 scale each block gets: llama.cpp reads the file, every
    block decodes closer to the float weights than llama.cpp's own min-max rounding."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    paths = {}
    for flag in ("--no-clip", "--clip"):
        out = tmp_path / f"m{flag}.gguf"
        run_cli(
            "quantize", str(tiny_model), "--gguf-type", "Q4_0", flag, "-o", str(out), check=True
        )
        paths[flag] = out
    prov = open_checkpoint(paths["--clip"]).provenance
    assert prov is not None and prov["params"]["method"]["clip"] is True
    base = open_checkpoint(tiny_model)
    errs = {}
    for flag, path in paths.items():
        r = GGUFReader(path)
        t = next(t for t in r.tensors if t.name == "blk.0.ffn_down.weight")
        assert t.tensor_type.name == "Q4_0"
        w = dequantize(t.data, t.tensor_type).reshape(-1)
        ref = base.get("model.layers.0.mlp.down_proj.weight").float().numpy().reshape(-1)
        errs[flag] = float((abs(w - ref) ** 2.4).sum())
    assert errs["--clip"] < errs["--no-clip"]
    from llama_cpp import Llama

    llm = Llama(str(paths["--clip"]), n_ctx=64, verbose=False)
    assert len(llm.tokenize(b"hello world")) > 0
