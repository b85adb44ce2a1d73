"""The importance matrix: computed from calibration text, handed to llama.cpp's quantizer,
written and read back, and refused where it cannot apply."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cllm.formats.checkpoint import open_checkpoint
from cllm.formats.imatrix import read_imatrix
from tests.conftest import cli_in_process


@pytest.fixture(scope="module")
def wide_text(wide_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cllm.testing.tiny import tiny_text

    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(tiny_text(4000))
    return path


def test_matrix_is_the_mean_square_of_each_linear_input(wide_model: Path, wide_text: Path) -> None:
    """Against a direct computation: the whole model run with hooks on every Linear."""
    from transformers import AutoModelForCausalLM

    from cllm.core.calib import load_calibration
    from cllm.core.quantize.imatrix import collect_imatrix
    from cllm.formats.arch import spec_for_config

    ckpt = open_checkpoint(wide_model)
    calib = load_calibration(wide_text, ckpt.tokenizer_dir(), samples=4, seqlen=32, seed=0)
    im = collect_imatrix(ckpt, calib, batch_size=2)
    model = AutoModelForCausalLM.from_pretrained(wide_model, dtype=torch.float32).eval()
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):

            def hook(_m: torch.nn.Module, inp: tuple[torch.Tensor, ...], name: str = name) -> None:
                x = inp[0].reshape(-1, inp[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + x.square().sum(0)

            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(calib.ids)
    spec = spec_for_config(ckpt.config)
    n_layers = int(ckpt.config["num_hidden_layers"])
    assert len(im.names) == 7 * n_layers
    tokens = calib.ids.numel()
    for name, s in sums.items():
        gguf = spec.gguf_name(name + ".weight", n_layers)
        assert gguf in im.sums
        np.testing.assert_allclose(im.mean(gguf), (s / tokens).numpy(), rtol=2e-4, atol=1e-7)
        assert im.counts[gguf][0] == tokens
    # q/k/v read one tensor: one accumulation, the same values
    assert np.array_equal(im.mean("blk.0.attn_q.weight"), im.mean("blk.0.attn_v.weight"))


def test_iq_types_need_it_and_run_with_it(
    wide_model: Path, wide_text: Path, tmp_path: Path
) -> None:
    calib = ["--calib", str(wide_text), "--calib-samples", "8", "--calib-seqlen", "32"]
    refused = cli_in_process(
        "quantize", str(wide_model), "--gguf-type", "IQ2_XS", "-o", str(tmp_path / "a.gguf")
    )
    assert refused.returncode == 2, refused.stderr
    assert "needs an importance matrix" in refused.stderr and "--imatrix auto" in refused.stderr
    assert not (tmp_path / "a.gguf").exists()

    out = tmp_path / "iq2.gguf"
    mat = tmp_path / "wide.imatrix.gguf"
    p = cli_in_process("quantize", str(wide_model), "--gguf-type", "IQ2_XS", "--imatrix", "auto", *calib,
                       "--imatrix-out", str(mat), "-o", str(out), "--json")  # fmt: skip
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout)
    assert rec["path"] == str(out)
    types = {i.dtype for i in open_checkpoint(out).tensor_infos().values()}
    assert "IQ2_XS" in types
    prov = open_checkpoint(out).provenance
    assert prov["params"]["imatrix"]["source"] == "auto"
    im = read_imatrix(mat)
    assert im.provenance is not None and im.provenance["id"] == prov["id"]

    # the written file feeds a later run, and is recorded by its content hash
    again = cli_in_process("quantize", str(wide_model), "--gguf-type", "IQ2_XS", "--imatrix", str(mat),
                           "-o", str(tmp_path / "again.gguf"))  # fmt: skip
    assert again.returncode == 0, again.stderr
    prov2 = open_checkpoint(tmp_path / "again.gguf").provenance
    assert prov2["params"]["imatrix"] == {
        "source": "file",
        "sha256": im.digest(),
        "entries": len(im.names),
    }
    # llama.cpp quantized the same weights with the same matrix: the same tensors
    a, b = open_checkpoint(out), open_checkpoint(tmp_path / "again.gguf")
    for name in a.tensor_infos():
        assert torch.equal(a.get(name), b.get(name)), name


def test_matrix_changes_what_llama_cpp_writes(
    wide_model: Path, wide_text: Path, tmp_path: Path
) -> None:
    """Q4_K_M with and without: the imatrix-weighted search picks other scales, and the
    output error weighted by the input statistics it was given is smaller."""
    calib = ["--calib", str(wide_text), "--calib-samples", "8", "--calib-seqlen", "32"]
    plain = tmp_path / "plain.gguf"
    weighted = tmp_path / "weighted.gguf"
    mat = tmp_path / "m.gguf"
    for args in (
        ["--gguf-type", "Q4_K_M", "-o", str(plain)],
        ["--imatrix-out", str(mat), *calib],
        ["--gguf-type", "Q4_K_M", "--imatrix", str(mat), "-o", str(weighted)],
    ):
        p = cli_in_process("quantize", str(wide_model), *args)
        assert p.returncode == 0, p.stderr
    src, a, b = open_checkpoint(wide_model), open_checkpoint(plain), open_checkpoint(weighted)
    im = read_imatrix(mat)
    from cllm.formats.arch import spec_for_config

    spec = spec_for_config(src.config)
    n_layers = int(src.config["num_hidden_layers"])
    errs = {"plain": 0.0, "weighted": 0.0}
    differ = 0
    for name in src.tensor_infos():
        gguf = spec.gguf_name(name, n_layers)
        if gguf not in im.sums:
            continue
        w = src.get(name).double()
        imp = torch.from_numpy(im.mean(gguf)).double()
        for key, q in (("plain", a.get(name).double()), ("weighted", b.get(name).double())):
            errs[key] += float(((q - w).square() * imp).sum())
        differ += int(not torch.equal(a.get(name), b.get(name)))
    assert differ > 0
    assert errs["weighted"] < errs["plain"]


def test_refusals(wide_model: Path, tmp_path: Path, tiny_model: Path) -> None:
    p = cli_in_process(
        "quantize",
        str(wide_model),
        "--method",
        "gptq",
        "--gguf-type",
        "Q4_K_M",
        "--imatrix",
        "auto",
    )
    assert p.returncode == 2 and "--imatrix weights llama.cpp's quantizer" in p.stderr
    p = cli_in_process("quantize", str(wide_model), "--imatrix", "auto")
    assert p.returncode == 2 and "--gguf-type" in p.stderr
    p = cli_in_process(
        "quantize", str(wide_model), "--gguf-type", "Q4_K_M", "--imatrix", str(tmp_path / "nope")
    )
    assert p.returncode == 2 and "no such file" in p.stderr
    # a matrix computed for another model (other widths) is refused before llama.cpp runs
    other = tmp_path / "other.imatrix.gguf"
    p = cli_in_process("quantize", str(tiny_model), "--imatrix-out", str(other), "--calib-samples", "2",
                       "--calib-seqlen", "16")  # fmt: skip
    assert p.returncode == 0, p.stderr
    out = tmp_path / "x.gguf"
    p = cli_in_process(
        "quantize",
        str(wide_model),
        "--gguf-type",
        "Q4_K_M",
        "--imatrix",
        str(other),
        "-o",
        str(out),
    )
    assert p.returncode == 2 and "computed for another model" in p.stderr, p.stderr
    assert not out.exists()
    # never over a file cllm did not write
    mine = tmp_path / "mine.dat"
    mine.write_bytes(b"not mine")
    p = cli_in_process("quantize", str(wide_model), "--imatrix-out", str(mine))
    assert p.returncode == 2 and "did not write" in p.stderr
    assert mine.read_bytes() == b"not mine"


@pytest.fixture(scope="module")
def wide_matrix(
    wide_model: Path, wide_text: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("imatrix") / "wide.imatrix.gguf"
    p = cli_in_process("quantize", str(wide_model), "--imatrix-out", str(out), "--calib", str(wide_text),
                       "--calib-samples", "8", "--calib-seqlen", "32")  # fmt: skip
    assert p.returncode == 0, p.stderr
    return out


# the ftypes whose main tensor type has another name (llama.cpp's mixes)
MAIN_TYPE = {"IQ2_S": "IQ2_XS", "IQ2_M": "IQ2_S", "IQ3_XS": "IQ3_S", "IQ3_M": "IQ3_S"}


@pytest.mark.slow
def test_every_iq_type_is_written_and_runs_in_llama_cpp(
    wide_model: Path, wide_matrix: Path, tmp_path: Path
) -> None:
    """Each IQ type with the matrix; then llama.cpp loads every file and computes finite
    logits (in a child process, as a crash there must not take pytest down)."""

    from cllm.core.quantize.api import IQ_TYPES

    files = []
    for t in IQ_TYPES:
        out = tmp_path / f"{t}.gguf"
        p = cli_in_process(
            "quantize",
            str(wide_model),
            "--gguf-type",
            t,
            "--imatrix",
            str(wide_matrix),
            "-o",
            str(out),
        )
        assert p.returncode == 0, (t, p.stderr)
        types = {i.dtype for i in open_checkpoint(out).tensor_infos().values()}
        assert MAIN_TYPE.get(t, t) in types, (t, types)
        files.append(str(out))
    # through cllm's llama.cpp worker, which survives llama.cpp's AMX crash on Intel CPUs
    from cllm.core.eval.backends import LlamaCppBackend

    for f in files:
        backend = LlamaCppBackend(Path(f), ctx=32, threads=2)
        try:
            assert np.isfinite(backend.logits(np.array([1, 5, 9, 12]))).all(), f
        finally:
            backend.close()


@pytest.mark.parametrize("name", ["imatrix.gguf", "input-f32.gguf"])
def test_output_may_take_the_name_of_a_helper_file(
    wide_model: Path, wide_text: Path, tmp_path: Path, name: str
) -> None:
    """The F32 input and the matrix llama.cpp's quantizer reads are written beside the
    output's temporary file: an output named like one of them once lost its own file."""
    out = tmp_path / name
    p = cli_in_process(
        "quantize", str(wide_model), "--gguf-type", "Q4_K_M", "--imatrix", "auto",
        "--calib", str(wide_text), "--calib-samples", "4", "--calib-seqlen", "32", "-o", str(out),
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(out)
    assert open_checkpoint(out).tensor_infos()
    assert sorted(f.name for f in tmp_path.iterdir()) == [name]
