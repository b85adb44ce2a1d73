"""`cllm bench` on tiny models: every backend, the JSON/CSV schema, the standalone runner."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cli

SMALL = ["--prompt", "16", "--gen", "8", "--repeat", "2", "--warmup", "1", "--threads", "2"]


@pytest.fixture(scope="module")
def models(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench")
    gguf, onnx_dir = root / "tiny.Q8_0.gguf", root / "tiny.onnx"
    run_cli(
        "export",
        str(tiny_model),
        "--to",
        "gguf",
        "--gguf-type",
        "Q8_0",
        "-o",
        str(gguf),
        check=True,
    )
    run_cli("export", str(tiny_model), "--to", "onnx", "-o", str(onnx_dir), check=True)
    return {"torch": tiny_model, "llama.cpp": gguf, "onnxruntime": onnx_dir}


def test_one_json_record_per_model_with_ratios(models: dict[str, Path]) -> None:
    order = ["llama.cpp", "torch", "onnxruntime"]
    p = run_cli("bench", *(str(models[b]) for b in order), *SMALL, "--json", check=True)
    recs = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["backend"] for r in recs] == order  # picked from the file type
    for r in recs:
        assert r["schema"] == "cllm.bench/1"
        assert r["prompt"] == 16 and r["gen"] == 8 and r["repeat"] == 2 and r["threads"] == 2
        for key in ("pp_tps", "tg_tps", "ttft_ms"):
            assert 0 < r[key]["min"] <= r[key]["median"] <= r[key]["max"]
        lat = r["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
        assert r["load_s"] > 0 and r["file_bytes"] > 0
        # a child's own peak, not the parent's (which holds torch): tiny models stay small
        assert 10e6 < r["peak_rss_bytes"] < (2e9 if r["backend"] == "torch" else 400e6)
        bw = r["bandwidth"]
        assert bw["weight_bytes_per_token"] > 0 and bw["machine_copy_bytes_per_s"] > 1e8
        assert bw["achieved_bytes_per_s"] == pytest.approx(
            bw["weight_bytes_per_token"] * r["tg_tps"]["median"]
        )
        assert r["device"]["cores"] >= 1 and r["runtime"]["name"] == r["backend"]
    assert recs[0]["vs_first"]["tg_tps"] == 1.0
    assert recs[1]["vs_first"]["tg_tps"] == pytest.approx(
        recs[1]["tg_tps"]["median"] / recs[0]["tg_tps"]["median"]
    )
    # Q8_0 weights read per token: about a quarter of the fp32 model's
    assert (
        recs[0]["bandwidth"]["weight_bytes_per_token"]
        < 0.4 * recs[1]["bandwidth"]["weight_bytes_per_token"]
    )


def test_csv_and_table_outputs(models: dict[str, Path]) -> None:
    p = run_cli("bench", str(models["llama.cpp"]), *SMALL, "--csv", check=True)
    rows = list(csv.DictReader(io.StringIO(p.stdout)))
    assert len(rows) == 1 and rows[0]["backend"] == "llama.cpp" and float(rows[0]["tg_tps"]) > 0
    t = run_cli("bench", str(models["onnxruntime"]), *SMALL, check=True)
    assert "onnxruntime" in t.stdout and "tg tok/s" in t.stdout
    assert "[1/1]" in t.stderr  # progress and logs go to stderr


def test_backend_override_converts_to_gguf(models: dict[str, Path]) -> None:
    p = run_cli("bench", str(models["torch"]), "-b", "llama.cpp", *SMALL, "--json", check=True)
    rec = json.loads(p.stdout)
    assert rec["backend"] == "llama.cpp" and rec["model"].endswith(".F32.gguf")


def test_standalone_runner_needs_no_cllm(models: dict[str, Path], tmp_path: Path) -> None:
    """What bundles ship: the runner and its loader guard, run by path, import nothing of cllm."""
    from cllm.standalone import shipped_files

    runner, *others = shipped_files()
    shutil.copy(runner, tmp_path / "bench.py")
    for f in others:
        shutil.copy(f, tmp_path / f.name)
    for backend in ("llama.cpp", "onnxruntime"):
        code = (
            "import runpy, sys\n"
            f"sys.argv = ['bench.py', {str(models[backend])!r}, '--prompt', '8', '--gen', '4',"
            " '--repeat', '1', '--warmup', '0']\n"
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "bad = [m for m in sys.modules if m == 'cllm' or m.startswith('cllm.') or m == 'torch']\n"
            "assert not bad, bad\n"
        )
        # the bare runner has no retry: on an Intel Xeon whose AMX probe passes, llama.cpp's
        # AMX path still crashed (2026-12-03), so it runs without the extra buffer types
        env = {**os.environ, "CLLM_AMX": "off"}
        p = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env
        )
        assert p.returncode == 0, p.stderr
        rec = json.loads(p.stdout)
        assert rec["backend"] == backend and rec["schema"] == "cllm.bench/1"


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--repeat", "0"], "--repeat 0"),
        (["--backend", "onnxruntime"], "is not an ONNX export"),
        (["--csv", "--json"], "not both"),
    ],
)
def test_bad_bench_arguments(models: dict[str, Path], args: list[str], needle: str) -> None:
    p = run_cli("bench", str(models["llama.cpp"]), *args)
    assert p.returncode == 2, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("cllm bench: error:") and needle in last
    assert p.stdout == "" and "Traceback" not in p.stderr


def test_runtime_failure_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "broken.onnx"
    bad.mkdir()
    (bad / "model.onnx").write_bytes(b"not a protobuf")
    p = run_cli("bench", str(bad), *SMALL)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("cllm bench: error:")
