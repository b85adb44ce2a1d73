"""The pipe contract: stdout carries data only, errors are one line, outputs are atomic and Make-friendly."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import cli_in_process, run_cli

ANSI = re.compile(r"\x1b\[")


def test_import_cli_does_not_import_torch() -> None:
    code = "import sys, cllm.cli; bad = [m for m in ('torch', 'transformers', 'onnxruntime', 'llama_cpp') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_version_and_help() -> None:
    v = run_cli("--version")
    assert v.returncode == 0 and v.stdout.startswith("cllm ")
    for cmd in ("info", "eval", "export"):
        h = run_cli(cmd, "--help")
        assert h.returncode == 0
        assert "Example" in h.stdout, f"{cmd} --help shows no example"


@pytest.mark.parametrize(
    "args,needle",
    [
        (["export", "x", "--to", "nope"], "--to"),
        (["info"], "CHECKPOINT"),
        (["eval", "x", "--bogus"], "--bogus"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_usage_errors_are_one_line_exit_2(args: list[str], needle: str) -> None:
    p = run_cli(*args)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert (
        lines[0].startswith("cllm")
        and ": error: " in lines[0]
        and needle.lower() in lines[0].lower()
    )
    assert p.stdout == ""


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    p = run_cli("info", str(tmp_path / "nope.gguf"))
    assert p.returncode == 2
    assert p.stderr.startswith("cllm info: error: no such file or folder")
    assert len(p.stderr.strip().splitlines()) == 1


def test_export_prints_only_the_path_and_is_make_friendly(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    p = run_cli(
        "export",
        str(tiny_model),
        "--to",
        "gguf",
        "--gguf-type",
        "Q8_0",
        "-o",
        str(out),
        env={"NO_COLOR": "1"},
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout == f"{out}\n"
    assert not ANSI.search(p.stderr)
    mtime = out.stat().st_mtime_ns
    again = run_cli(
        "export", str(tiny_model), "--to", "gguf", "--gguf-type", "Q8_0", "-o", str(out)
    )
    assert again.returncode == 0 and again.stdout == f"{out}\n"
    assert "up to date" in again.stderr
    assert out.stat().st_mtime_ns == mtime
    forced = run_cli(
        "export", str(tiny_model), "--to", "gguf", "--gguf-type", "Q8_0", "-o", str(out), "--force"
    )
    assert forced.returncode == 0 and out.stat().st_mtime_ns != mtime
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temporary files left


def test_default_output_name_is_deterministic(tiny_model: Path, tmp_path: Path) -> None:
    dry = run_cli("export", str(tiny_model), "--to", "gguf", "--gguf-type", "Q4_0", "--dry-run")
    assert dry.returncode == 0
    planned = Path(dry.stdout.strip())
    assert planned.parent == tiny_model.parent
    assert re.fullmatch(r"tiny-llama\.export-[0-9a-f]{8}\.gguf", planned.name)
    assert not planned.exists()
    other = run_cli("export", str(tiny_model), "--to", "gguf", "--gguf-type", "Q5_0", "--dry-run")
    assert other.stdout.strip() != dry.stdout.strip()


def test_json_records_and_stdin_pipe(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "one.safetensors"
    p = run_cli(
        "--json", "export", str(tiny_model), "--to", "safetensors", "--single-file", "-o", str(out)
    )
    assert p.returncode == 0, p.stderr
    record = json.loads(p.stdout)
    assert (
        record["path"] == str(out)
        and record["format"] == "safetensors"
        and record["op"] == "export"
    )
    assert record["bytes"] == out.stat().st_size and len(record["sha256"]) == 64
    assert record["params"] == {"to": "safetensors", "single_file": True, "dtype": None}
    # a JSON record on stdin is accepted as the checkpoint argument
    info = run_cli("info", "-", "--json", "--no-sparsity", stdin=p.stdout)
    assert info.returncode == 0, info.stderr
    rep = json.loads(info.stdout)
    assert rep["path"] == str(out) and rep["layers"] == 2 and rep["params"] == 107840
    assert rep["provenance"][0]["op"] == "export"
    # and so is a plain path
    plain = run_cli("info", "-", "--json", stdin=f"{out}\n")
    assert json.loads(plain.stdout)["sparsity"] == 0.0


def test_pipeline_export_then_eval_with_kld(
    tiny_model: Path, tiny_text: Path, tmp_path: Path
) -> None:
    env = {**os.environ, "NO_COLOR": "1"}
    cmd = (
        f"{sys.executable} -m cllm export {tiny_model} --to gguf --gguf-type Q8_0 -o {tmp_path / 'q.gguf'}"
        f" | {sys.executable} -m cllm eval - --backend llama.cpp --text {tiny_text} --ctx 64 --chunks 2"
        f" --kld-base {tiny_model} --json"
    )
    p = subprocess.run(
        ["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, env=env, timeout=300
    )
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["backend"] == "llama.cpp" and res["kld"]["mean"] > 0
    assert res["protocol"]["chunks"] == 2 and res["protocol"]["tokens_scored"] == 62


def test_quality_gates_exit_3(tiny_model: Path, tiny_text: Path) -> None:
    base = ["eval", str(tiny_model), "--text", str(tiny_text), "--ctx", "64", "--chunks", "1"]
    ok = cli_in_process(*base, "--fail-under", "1e9", "--json")
    assert ok.returncode == 0
    bad = run_cli(*base, "--fail-under", "1.0")  # the exit code a shell sees
    assert bad.returncode == 3
    assert bad.stderr.strip().splitlines()[-1].startswith("cllm eval: error: perplexity")
    kld = cli_in_process(*base, "--kld-base", str(tiny_model), "--max-kld", "-1")
    assert kld.returncode == 3 and "mean KLD" in kld.stderr


def test_provenance_chain_through_formats(tiny_model: Path, tmp_path: Path) -> None:
    g = tmp_path / "a.gguf"
    s = tmp_path / "b.safetensors"
    assert (
        cli_in_process(
            "export", str(tiny_model), "--to", "gguf", "--gguf-type", "F16", "-o", str(g)
        ).returncode
        == 0
    )
    cli_in_process("export", str(g), "--to", "safetensors", "--single-file", "-o", str(s))
    rep = json.loads(cli_in_process("info", str(s), "--json", "--no-sparsity").stdout)
    chain = rep["provenance"]
    assert [c["params"]["to"] for c in chain] == ["safetensors", "gguf"]
    from cllm.formats.hashing import file_sha256

    assert chain[0]["parent_sha256"] == file_sha256(g)
    assert (
        rep["types"]["F16"]["tensors"] == 16
    )  # F16 came through as stored (converted back to F16)


def test_failed_write_leaves_nothing(tiny_model: Path, tmp_path: Path) -> None:
    from cllm.formats.checkpoint import open_checkpoint
    from cllm.formats.safetensors_io import PlannedTensor
    from cllm.formats.save import plan_tensors, save_single_file

    ckpt = open_checkpoint(tiny_model)
    plans = plan_tensors(ckpt)

    def boom():  # noqa: ANN202
        raise KeyboardInterrupt

    plans[5] = PlannedTensor(plans[5].name, plans[5].shape, plans[5].dtype, boom)
    out = tmp_path / "x.safetensors"
    with pytest.raises(KeyboardInterrupt):
        save_single_file(out, ckpt.config, plans, ckpt.tokenizer_dir(), {}, {})
    assert list(tmp_path.iterdir()) == []
