"""`cllm prune` end to end on the tiny model: outputs, pipes, reuse, --dry-run, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cllm.cli import app
from cllm.formats.checkpoint import open_checkpoint
from tests.conftest import cli_in_process, run_cli

CAL = ["--calib-samples", "8", "--calib-seqlen", "64"]


def _in_process(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def _linear_zeros(path: Path) -> dict[str, float]:
    ckpt = open_checkpoint(path)
    return {
        n: float((ckpt.get(n) == 0).float().mean())
        for n in ckpt.tensor_infos()
        if n.endswith("_proj.weight")
    }


def test_wanda_writes_exact_sparsity_with_provenance_and_is_make_friendly(
    tiny_model: Path, tiny_text: Path, tmp_path: Path
) -> None:
    out = tmp_path / "w"
    args = ["prune", str(tiny_model), "--method", "wanda", "--sparsity", "0.5",
            "--calib", str(tiny_text), *CAL, "-o", str(out)]  # fmt: skip
    p = run_cli(*args, "--json")
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout)
    assert rec["path"] == str(out) and rec["op"] == "prune" and rec["format"] == "safetensors"
    assert rec["params"]["method"] == "wanda" and len(rec["params"]["calibration_sha256"]) == 64
    zeros = _linear_zeros(out)
    assert len(zeros) == 14 and all(z == 0.5 for z in zeros.values()), zeros
    ckpt = open_checkpoint(out)
    assert ckpt.provenance["op"] == "prune"
    assert ckpt.provenance["calibration"]["samples"] == 8
    # untouched tensors are the input's, bit for bit
    base = open_checkpoint(tiny_model)
    assert torch.equal(ckpt.get("model.embed_tokens.weight"), base.get("model.embed_tokens.weight"))
    again = run_cli(*args)
    assert again.returncode == 0 and again.stdout == f"{out}\n"
    assert "up to date" in again.stderr


def test_dry_run_prints_the_default_name_and_writes_nothing(
    tiny_model: Path, tiny_text: Path, tmp_path: Path
) -> None:
    import shutil

    src = tmp_path / "m"
    shutil.copytree(tiny_model, src)
    p = run_cli("prune", str(src), "--method", "sparsegpt", "--pattern", "2:4",
                "--calib", str(tiny_text), *CAL, "--dry-run")  # fmt: skip
    assert p.returncode == 0, p.stderr
    planned = Path(p.stdout.strip())
    assert planned.parent == tmp_path and planned.name.startswith("m.prune-")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m"]


def test_sensitivity_dry_run_measures_nothing(tiny_model: Path, tmp_path: Path) -> None:
    """The bug the job pipeline fixed: --sensitivity --dry-run used to run the measurement
    and write its files (quantize); prune's shares the pipeline."""
    for cmd in (["quantize"], ["prune", "--method", "wanda"]):
        out = tmp_path / f"{cmd[0]}.json"
        p = cli_in_process(cmd[0], str(tiny_model), *cmd[1:], "--sensitivity", "--dry-run",
                           "-o", str(out))  # fmt: skip
        assert p.returncode == 0, p.stderr
        assert p.stdout.split() == [str(out), str(out.with_suffix(".png"))]
        assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_prune_sensitivity_map_and_profile_file(
    tiny_model: Path, tiny_text: Path, tmp_path: Path
) -> None:
    sens = tmp_path / "s.json"
    p = run_cli("prune", str(tiny_model), "--method", "wanda", "--sensitivity",
                "--calib", str(tiny_text), "--sensitivity-chunks", "1", "-o", str(sens))  # fmt: skip
    assert p.returncode == 0, p.stderr
    data = json.loads(sens.read_text())
    assert data["columns"] == ["attention", "mlp"] and len(data["kld"]) == 2
    assert all(v > 0 for row in data["kld"] for v in row)
    assert sens.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "p"
    q = run_cli("prune", str(tiny_model), "--method", "wanda", "--sparsity", "0.5",
                "--profile", str(sens), "--calib", str(tiny_text), *CAL, "-o", str(out),
                "--json")  # fmt: skip
    assert q.returncode == 0, q.stderr
    per_layer = json.loads(q.stdout)["params"]["profile"]["layer_sparsity"]
    assert len(per_layer) == 2 and per_layer[0] != per_layer[1]
    assert sum(per_layer) / 2 == pytest.approx(0.5, abs=1e-6)  # equal-sized layers
    # the more sensitive layer (larger summed KLD) keeps more weights
    scores = [sum(row) for row in data["kld"]]
    assert (per_layer[0] < per_layer[1]) == (scores[0] > scores[1])


def test_prune_pipes_into_quantize(tiny_model: Path, tiny_text: Path, tmp_path: Path) -> None:
    pruned = run_cli("prune", str(tiny_model), "--method", "magnitude", "--pattern", "2:4",
                     "-o", str(tmp_path / "p"), check=True)  # fmt: skip
    q = run_cli("quantize", "-", "--gguf-type", "Q4_0", "-o", str(tmp_path / "q.gguf"),
                stdin=pruned.stdout)  # fmt: skip
    assert q.returncode == 0, q.stderr
    prov = open_checkpoint(tmp_path / "q.gguf").provenance
    assert prov["op"] == "quantize" and prov["parent"]["provenance"]["op"] == "prune"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--sparsity", "1.0"], "outside [0, 1)"),
        (["--sparsity", "-0.1"], "outside [0, 1)"),
        (["--pattern", "4:4"], "smaller than M"),
        (["--pattern", "2-4"], "is not N:M"),
        (["--pattern", "2:4", "--sparsity", "0.7"], "fixes the sparsity"),
        (["--method", "obd"], "unknown --method obd"),
        (["--layers", "0-9"], "names layer 9"),
        (["--keep", "("], "not a valid regular expression"),
        (["--structured", "mlp"], "--structured needs --ratio"),
        (["--structured", "mlp", "--ratio", "1.0"], "ratio"),
        (["--structured", "heads", "--ratio", "0.9"], "head"),
        (["--drop-layers", "2"], "leaves no layer"),
        (["--drop-layers", "1", "--sparsity", "0.5"], "apply to --method"),
        (["--method", "wanda", "--structured", "mlp", "--ratio", "0.5"], "give one of"),
        (["--profile", "nope.json"], "no such file"),
        (["--calib-samples", "0"], "too small"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    tiny_model: Path, tmp_path: Path, args: list[str], needle: str
) -> None:
    out = tmp_path / "o"
    code, stdout, stderr = _in_process("prune", str(tiny_model), *args, "-o", str(out))
    assert code == 2, (stdout, stderr)
    assert stdout == ""
    assert stderr.startswith("cllm prune: error: ") and stderr.count("\n") == 1, stderr
    assert needle in stderr, stderr
    assert list(tmp_path.iterdir()) == []


def test_structured_on_quantized_input_needs_dequantize(tiny_model: Path, tmp_path: Path) -> None:
    q = tmp_path / "q.gguf"
    run_cli("quantize", str(tiny_model), "--gguf-type", "Q8_0", "-o", str(q), check=True)
    code, stdout, stderr = _in_process(
        "prune", str(q), "--structured", "mlp", "--ratio", "0.25", "-o", str(tmp_path / "o")
    )
    assert code == 2 and "--dequantize" in stderr, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.gguf"]


def test_prune_refuses_to_replace_what_cllm_did_not_write(tiny_model: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, _, stderr = _in_process(
        "prune", str(tiny_model), "--method", "magnitude", "-o", str(mine)
    )
    assert code == 2, stderr
    assert (mine / "notes.txt").read_text() == "keep me"
