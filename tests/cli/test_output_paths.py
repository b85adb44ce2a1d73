"""-o never destroys what cllm did not write; killed runs' temporaries are cleaned up next time.

Every writing command refuses a foreign folder or file at its output path with exit 2 and one
line, before any work starts (so the ONNX and bundle cases cost no export), and leaves it
byte-identical; a cllm output of the same kind is reused or rebuilt as before.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import cli_in_process, run_cli, start_atomic_writer

MODEL = "{model}"
WRITERS = {
    "export-gguf": ["export", MODEL, "--to", "gguf", "--gguf-type", "Q8_0"],
    "export-safetensors-folder": ["export", MODEL, "--to", "safetensors"],
    "export-safetensors-file": ["export", MODEL, "--to", "safetensors", "--single-file"],
    "export-onnx": ["export", MODEL, "--to", "onnx", "--quant", "int4"],
    "export-bundle": ["export", MODEL, "--to", "bundle", "--target", "x86"],
    "quantize-packed": ["quantize", MODEL, "--bits", "4", "--group-size", "32"],
    "quantize-fake": ["quantize", MODEL, "--bits", "4", "--group-size", "32", "--fake"],
    "quantize-gguf": ["quantize", MODEL, "--gguf-type", "Q4_0"],
    "quantize-gguf-grid": ["quantize", MODEL, "--gguf-type", "Q4_0", "--clip"],
    "quantize-llamacpp": ["quantize", MODEL, "--gguf-type", "Q4_K_M"],
    "quantize-sensitivity": ["quantize", MODEL, "--sensitivity", "--sensitivity-chunks", "1"],
}


def _args(name: str, model: Path) -> list[str]:
    return [str(model) if a == MODEL else a for a in WRITERS[name]]


def _snapshot(root: Path) -> dict[str, bytes | None]:
    entries = [root, *sorted(root.rglob("*"))]
    return {str(p): (p.read_bytes() if p.is_file() else None) for p in entries}


def _one_error_line(p: subprocess.CompletedProcess[str], cmd: str) -> str:
    assert p.returncode == 2, p.stderr
    assert p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(f"cllm {cmd}: error: ")
    return lines[0]


# the folder case (the reported data loss) for every writer in the default suite; the file
# case, the same code path, with the slow tests
@pytest.mark.parametrize("what", ["folder", pytest.param("file", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", sorted(WRITERS))
def test_foreign_output_path_is_refused_and_left_untouched(
    tiny_model: Path, tmp_path: Path, name: str, what: str
) -> None:
    if what == "folder":
        out = tmp_path / "mydir"
        out.mkdir()
        (out / "thesis.tex").write_text("years of work")
    else:
        out = tmp_path / "mine.bin"
        out.write_bytes(b"\x00not cllm's\xff")
    before = _snapshot(tmp_path)
    args = _args(name, tiny_model)
    # the refusal comes before any work: in process (the file case runs a real process)
    run = cli_in_process if what == "folder" else run_cli
    p = run(*args, "-o", str(out))
    line = _one_error_line(p, args[0])
    assert line == (
        f"cllm {args[0]}: error: -o {out} is an existing {what} that cllm did not write. "
        "Choose another path or remove it."
    )
    assert _snapshot(tmp_path) == before  # nothing touched, no temporary left


def test_force_and_dry_run_do_not_override_the_refusal(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "mydir"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    before = _snapshot(tmp_path)
    for extra in ("--force", "--dry-run"):
        p = cli_in_process(*_args("export-gguf", tiny_model), "-o", str(out), extra)
        assert "cllm did not write" in _one_error_line(p, "export"), extra
    assert _snapshot(tmp_path) == before


def test_a_cllm_output_of_another_kind_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    g = tmp_path / "m.gguf"
    run_cli(*_args("export-gguf", tiny_model), "-o", str(g), check=True)
    before = _snapshot(tmp_path)
    for name in ("export-safetensors-folder", "export-onnx", "quantize-packed"):
        args = _args(name, tiny_model)
        line = _one_error_line(cli_in_process(*args, "-o", str(g)), args[0])
        assert f"-o {g} is a cllm GGUF file, not the " in line, line
    assert _snapshot(tmp_path) == before


def test_a_cllm_output_of_the_same_kind_is_rebuilt_or_reused(
    tiny_model: Path, tmp_path: Path
) -> None:
    from cllm.formats.checkpoint import open_checkpoint

    out = tmp_path / "q"
    run_cli("export", str(tiny_model), "--to", "safetensors", "-o", str(out), check=True)
    first = open_checkpoint(out).provenance
    # another cllm HF folder at -o: quantize replaces it (a Makefile re-run with new flags)
    p = run_cli(*_args("quantize-packed", tiny_model), "-o", str(out))
    assert p.returncode == 0, p.stderr
    second = open_checkpoint(out).provenance
    assert first and second and second["op"] == "quantize" and second["id"] != first["id"]
    again = run_cli(*_args("quantize-packed", tiny_model), "-o", str(out))
    assert again.returncode == 0 and "up to date" in again.stderr
    assert again.stdout == f"{out}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


@pytest.mark.slow  # three sensitivity measurements (about 15 s); CI runs the slow tests
def test_sensitivity_outputs_are_marked_reused_and_a_foreign_png_is_refused(
    tiny_model: Path, tiny_text: Path, tmp_path: Path
) -> None:
    from cllm.formats.outputs import PROVENANCE_KEY, png_text

    sens = tmp_path / "sens.json"
    png = tmp_path / "sens.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\nsomeone's picture")
    args = [*_args("quantize-sensitivity", tiny_model), "--calib", str(tiny_text), "-o", str(sens)]
    line = _one_error_line(run_cli(*args), "quantize")
    assert f"{png} (the heat map beside -o {sens}) is an existing file that cllm did not" in line
    assert not sens.exists() and png.read_bytes().endswith(b"someone's picture")
    png.unlink()
    run_cli(*args, check=True)
    prov = json.loads(sens.read_text())["provenance"]
    assert prov["op"] == "sensitivity"
    assert json.loads(png_text(png)[PROVENANCE_KEY])["id"] == prov["id"]
    before = _snapshot(tmp_path)
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert again.stdout.split() == [str(sens), str(png)] and "up to date" in again.stderr
    assert _snapshot(tmp_path) == before


def _killed_writer_leftover(dest: Path) -> tuple[Path, int]:
    """Start writing `dest` through atomic_path in a child, SIGKILL it mid-write."""
    child = start_atomic_writer(dest)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    (left,) = [p for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}.")]
    return left, child.pid


def test_the_next_run_removes_what_a_killed_run_left_and_says_so(
    tiny_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "m.gguf"
    left, pid = _killed_writer_leftover(out)
    unknown = tmp_path / ".m.gguf.unknown1.tmp"  # no owner record: not ours to judge
    unknown.mkdir()
    p = run_cli(*_args("export-gguf", tiny_model), "-o", str(out), env={"NO_COLOR": "1"})
    assert p.returncode == 0, p.stderr
    assert p.stdout == f"{out}\n"
    assert (
        f"warning: removed {left.name} beside {tmp_path}: a temporary left by cllm process "
        f"{pid}, which is no longer running"
    ) in p.stderr
    assert not left.exists() and unknown.exists()
    assert sorted(q.name for q in tmp_path.iterdir()) == [unknown.name, "m.gguf"]
