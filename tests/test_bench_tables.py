"""Benchmark tables name the CPU they were measured on, so AMD and Intel figures never mix."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import REPO


def _common():  # noqa: ANN202 - bench/ is scripts, not a package
    spec = importlib.util.spec_from_file_location("bench_common", REPO / "bench" / "_common.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    pytest.skip("no model name in /proc/cpuinfo")


def test_every_table_names_the_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    common = _common()
    common.print_table("a title", ["a", "b"], [["1", "2"]])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "a title"
    assert lines[1].startswith("machine: ") and _cpu_model() in lines[1]
    amx = "amx_tile" in Path("/proc/cpuinfo").read_text()
    assert ("lists AMX" in lines[1]) == amx


def test_results_record_the_cpu_and_amx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    common = _common()
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    out = common.write_results("t", [{"x": 1}])
    machine = json.loads(out.read_text())["machine"]
    assert machine["cpu"] == _cpu_model() and isinstance(machine["amx"], bool)
