"""`cllm report` through the CLI: stdout carries only the folder, errors are one line, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import cli_in_process
from tests.core.test_report import EVALS, PNG_MAGIC, bench_rec, eval_rec, write_ndjson


def test_report_writes_the_folder_and_prints_its_path(tmp_path: Path) -> None:
    results = write_ndjson(tmp_path / "results.ndjson", EVALS[:3])
    out = tmp_path / "rep"
    p = cli_in_process("report", str(results), "-o", str(out), "--title", "Tiny models")
    assert p.returncode == 0, p.stderr
    assert p.stdout == f"{out}\n"
    index = (out / "index.md").read_text()
    assert index.startswith("# Tiny models\n")
    assert (out / "pareto-size-kld.png").read_bytes().startswith(PNG_MAGIC)
    # no bench records: no speed plot, and index.md says why
    assert not (out / "pareto-speed-kld.png").exists()
    assert "`pareto-speed-kld.png`): no bench records" in index
    # same inputs again: up to date, the path again; --json gives the artifact record
    again = cli_in_process("report", str(results), "-o", str(out), "--title", "Tiny models",
                           "--json")  # fmt: skip
    assert again.returncode == 0, again.stderr
    rec = json.loads(again.stdout)
    assert rec["path"] == str(out) and rec["format"] == "report" and rec["op"] == "report"
    assert rec["bytes"] > 0 and len(rec["sha256"]) == 64
    assert "up to date" in again.stderr


def test_stdin_and_dry_run(tmp_path: Path) -> None:
    text = json.dumps(bench_rec("q4.gguf", 70.0)) + "\n"
    out = tmp_path / "rep"
    dry = cli_in_process("report", "-", "-o", str(out), "--dry-run", stdin=text)
    assert dry.returncode == 0 and dry.stdout == f"{out}\n" and not out.exists()
    p = cli_in_process("report", "-", "-o", str(out), stdin=text)
    assert p.returncode == 0, p.stderr
    index = (out / "index.md").read_text()
    assert "`<stdin>`" in index and "| 70.0 |" in index and "q4.gguf" in index


def test_a_line_that_is_not_a_cllm_record_is_exit_2_and_writes_nothing(tmp_path: Path) -> None:
    good = write_ndjson(tmp_path / "good.ndjson", [eval_rec("a.gguf", 80, 0.1)])
    bad = tmp_path / "bad.ndjson"
    bad.write_text(json.dumps(eval_rec("b.gguf", 90, 0.2)) + "\n" + '{"loss": 1.5}\n')
    out = tmp_path / "rep"
    p = cli_in_process("report", str(good), str(bad), "-o", str(out))
    assert p.returncode == 2
    assert p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(f"cllm report: error: {bad}:2: not a cllm record")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["bad.ndjson", "good.ndjson"]

    empty = tmp_path / "empty.ndjson"
    empty.write_text("")
    p = cli_in_process("report", str(good), str(empty), "-o", str(out))
    assert p.returncode == 2 and f"{empty} is empty" in p.stderr and not out.exists()


def test_a_folder_cllm_did_not_write_is_refused(tmp_path: Path) -> None:
    good = write_ndjson(tmp_path / "good.ndjson", [bench_rec("q4.gguf", 70.0)])
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.md").write_text("mine")
    p = cli_in_process("report", str(good), "-o", str(out))
    assert p.returncode == 2 and p.stdout == ""
    assert f"-o {out} is an existing folder that cllm did not write" in p.stderr
    assert [x.name for x in out.iterdir()] == ["thesis.md"]
    # a cllm report folder there is replaced
    rep = tmp_path / "rep"
    assert cli_in_process("report", str(good), "-o", str(rep)).returncode == 0
    other = write_ndjson(tmp_path / "other.ndjson", [bench_rec("q8.gguf", 40.0)])
    p = cli_in_process("report", str(other), "-o", str(rep))
    assert p.returncode == 0, p.stderr
    assert "q8.gguf" in (rep / "index.md").read_text()
    assert "q4.gguf" not in (rep / "index.md").read_text()


def test_help_has_an_example_and_bad_flags_are_usage_errors(tmp_path: Path) -> None:
    h = cli_in_process("report", "--help")
    assert (
        h.returncode == 0
        and "Example" in h.stdout
        and "cllm report eval.ndjson bench.ndjson" in h.stdout
    )
    p = cli_in_process("report", "x.ndjson", "--x", "speed")
    assert p.returncode == 2


def test_import_cli_does_not_import_matplotlib() -> None:
    code = "import sys, cllm.cli; print([m for m in ('matplotlib', 'torch') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
