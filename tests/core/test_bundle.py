"""Edge bundles: unpacked elsewhere, run.sh runs with only the runtime and prints bench JSON."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cli

QUICK = ["--prompt", "8", "--gen", "4", "--repeat", "1", "--warmup", "0"]


def _bundle(model: Path, target: str, out: Path) -> None:
    run_cli("export", str(model), "--to", "bundle", "--target", target, "-o", str(out), check=True)


def _run_bundle(bundle: Path, tmp_path: Path) -> dict:
    """Copy the bundle to a fresh folder (as a board would receive it) and run run.sh there."""
    fresh = tmp_path / "board" / "unpacked"
    shutil.copytree(bundle, fresh)
    # the bundle's target board has no AMX; on an Intel Xeon host llama.cpp's AMX path crashed
    # although the probe passed (2026-12-03), and the bare runner does not retry
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": "", "CLLM_AMX": "off"}
    p = subprocess.run(
        ["sh", str(fresh / "run.sh"), *QUICK], capture_output=True, text=True, env=env, cwd="/"
    )
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_rpi5_bundle_from_float_model(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "pi.bundle"
    p = run_cli("export", str(tiny_model), "--to", "bundle", "--target", "rpi5",
                "--gguf-type", "Q8_0", "-o", str(out), check=True)  # fmt: skip
    assert p.stdout.strip() == str(out)
    assert sorted(f.name for f in out.iterdir()) == [
        "README.txt", "bench.py", "energy.py", "guard.py", "manifest.json", "model.gguf", "run.sh",
    ]  # fmt: skip
    m = json.loads((out / "manifest.json").read_text())
    assert m["schema"] == "cllm.bundle/1" and m["target"] == "rpi5" and m["threads"] == 4
    assert m["runtime"]["name"] == "llama.cpp" and m["runtime"]["built_with"]
    data = (out / "model.gguf").read_bytes()
    assert m["model"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert m["model"]["bytes"] == len(data)
    assert m["provenance"]["params"]["target"] == "rpi5"
    rec = _run_bundle(out, tmp_path)
    assert rec["schema"] == "cllm.bench/1" and rec["backend"] == "llama.cpp"
    assert rec["threads"] == 4 and rec["model"] == "model.gguf" and rec["tg_tps"]["median"] > 0
    again = run_cli("export", str(tiny_model), "--to", "bundle", "--target", "rpi5",
                    "--gguf-type", "Q8_0", "-o", str(out), check=True)  # fmt: skip
    assert "up to date" in again.stderr


def test_gguf_input_is_bundled_byte_for_byte(tiny_model: Path, tmp_path: Path) -> None:
    g = tmp_path / "m.gguf"
    run_cli(
        "export", str(tiny_model), "--to", "gguf", "--gguf-type", "Q4_0", "-o", str(g), check=True
    )
    out = tmp_path / "x86.bundle"
    run_cli("export", str(g), "--to", "bundle", "--target", "x86", "-o", str(out), check=True)
    assert (out / "model.gguf").read_bytes() == g.read_bytes()


@pytest.mark.slow  # an ONNX build (about 20 s); CI runs the slow suite
def test_jetson_bundle_is_onnx_and_falls_back_to_cpu(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "jetson.bundle"
    _bundle(tiny_model, "jetson-orin", out)
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["format"] == "onnx" and (out / "model.onnx" / "model.onnx").is_file()
    assert m["runtime"]["providers"][:2] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    rec = _run_bundle(out, tmp_path)
    assert rec["backend"] == "onnxruntime"
    assert rec["runtime"]["providers"] == ["CPUExecutionProvider"]  # no GPU here


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--target", "pi-zero"], "unknown target pi-zero"),
        ([], "needs --target"),
        (["--target", "rpi5", "--quant", "int4"], "do not apply to bundles"),
    ],
)
def test_bad_bundle_arguments(
    tiny_model: Path, tmp_path: Path, args: list[str], needle: str
) -> None:
    p = run_cli("export", str(tiny_model), "--to", "bundle", *args, "-o", str(tmp_path / "b"))
    assert p.returncode == 2, p.stderr
    assert needle in p.stderr.strip().splitlines()[-1] and p.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_quantized_gguf_cannot_go_to_an_onnx_board(tiny_model: Path, tmp_path: Path) -> None:
    g = tmp_path / "q.gguf"
    run_cli(
        "export", str(tiny_model), "--to", "gguf", "--gguf-type", "Q8_0", "-o", str(g), check=True
    )
    out = tmp_path / "j.bundle"
    p = run_cli("export", str(g), "--to", "bundle", "--target", "jetson-orin", "-o", str(out))
    assert p.returncode == 2
    last = p.stderr.strip().splitlines()[-1]
    assert "cannot hold this model's Q8_0 weights" in last and "llama.cpp target" in last
    assert not out.exists() and sorted(f.name for f in tmp_path.iterdir()) == ["q.gguf"]


def test_info_shows_a_bundle(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "g.bundle"
    _bundle(tiny_model, "generic-arm64", out)
    rep = json.loads(run_cli("info", str(out), "--json", check=True).stdout)
    assert rep["format"] == "bundle" and rep["target"] == "generic-arm64"
    assert rep["runtime"] == "llama.cpp" and rep["provenance"][0]["op"] == "export"
    text = run_cli("info", str(out), check=True).stdout
    assert "generic-arm64" in text and "export" in text
