"""cllm distill on the real SmolLM2-135M (slow): a depth-pruned student's KLD to its
teacher drops, and the student goes down the quantize -> llama.cpp pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


@pytest.mark.timeout(1800)
def test_distilled_student_moves_toward_the_teacher_and_deploys(tmp_path: Path) -> None:
    student = run_cli(
        "prune", "smollm2-135m", "--drop-layers", "4", "--layer-metric", "last", "--dequantize",
        "-o", str(tmp_path / "depth4"), check=True,
    ).stdout.strip()  # fmt: skip
    proc = run_cli(
        "distill", student, "--teacher", "smollm2-135m", "--steps", "16", "--batch-size", "2",
        "--seqlen", "128", "--lr", "3e-4", "--eval-every", "16", "--eval-chunks", "2",
        "-o", str(tmp_path / "recovered"), check=True,
    )  # fmt: skip
    assert proc.stdout.strip() == str(tmp_path / "recovered")
    info = json.loads(run_cli("info", proc.stdout.strip(), "--json", check=True).stdout)
    prov = info["provenance"][0]
    assert prov["op"] == "distill"
    evals = prov["result"]["evals"]
    assert [e["step"] for e in evals] == [0, 16]
    assert evals[-1]["kld"] < 0.9 * evals[0]["kld"], evals
    gguf = run_cli(
        "quantize", "-", "--gguf-type", "Q8_0", "-o", str(tmp_path / "r.gguf"),
        stdin=proc.stdout, check=True,
    ).stdout.strip()  # fmt: skip
    rec = json.loads(
        run_cli(
            "eval",
            gguf,
            "-b",
            "llama.cpp",
            "--chunks",
            "2",
            "--kld-base",
            "smollm2-135m",
            "--json",
            check=True,
        ).stdout  # fmt: skip
    )
    assert rec["kld"]["mean"] < evals[0]["kld"]
