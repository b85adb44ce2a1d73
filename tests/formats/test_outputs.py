"""What may be written over, and what killed runs leave behind (formats/outputs.py, atomic.py)."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from cllm.errors import UsageError
from cllm.formats.atomic import atomic_path
from cllm.formats.leftovers import (
    OWNER_FILE,
    make_temp_dir,
    owner_record,
    remove_stale_temporaries,
    stale_temporaries,
)
from cllm.formats.outputs import Kind, check_output, inspect_output, mark_png, png_text
from cllm.formats.provenance import make_provenance
from tests.conftest import start_atomic_writer


def _prov(op: str = "export", **params: object) -> dict:
    return make_provenance(op, dict(params), "0" * 64, None)


def _png(path: Path) -> Path:
    """A valid 1x1 grey PNG, written by hand (no matplotlib needed)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
    data += chunk(b"IDAT", zlib.compress(b"\x00\x80")) + chunk(b"IEND", b"")
    path.write_bytes(data)
    return path


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every entry under `root` (and root itself) with its bytes: 'left byte-identical'."""
    entries = [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]
    return {str(p): (p.read_bytes() if p.is_file() else None) for p in entries}


@pytest.fixture(scope="module")
def cllm_outputs(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[Kind, Path]:
    """One cllm output of every kind, made by the real writers where they are cheap."""
    from cllm.formats.checkpoint import open_checkpoint
    from cllm.formats.save import plan_tensors, save_gguf, save_hf_folder, save_single_file

    root = tmp_path_factory.mktemp("cllm-outputs")
    ckpt = open_checkpoint(tiny_model)
    prov = _prov(to="x")
    save_gguf(root / "m.gguf", ckpt, "F16", prov)
    save_hf_folder(root / "hf", ckpt.config, plan_tensors(ckpt), ckpt.tokenizer_dir(), prov, {})
    save_single_file(
        root / "m.safetensors", ckpt.config, plan_tensors(ckpt), ckpt.tokenizer_dir(), prov, {}
    )
    onnx = root / "m.onnx"  # the inspection reads only the side file beside model.onnx
    onnx.mkdir()
    (onnx / "model.onnx").write_bytes(b"graph")
    (onnx / "cllm.json").write_text(json.dumps({"provenance": prov}))
    bundle = root / "m.bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(
        json.dumps({"schema": "cllm.bundle/1", "provenance": prov})
    )
    sens = _prov("sensitivity", chunks=1)
    (root / "s.json").write_text(json.dumps({"kld": [], "provenance": sens}))
    mark_png(_png(root / "s.png"), sens)
    return {
        Kind.GGUF: root / "m.gguf",
        Kind.HF_FOLDER: root / "hf",
        Kind.SAFETENSORS_FILE: root / "m.safetensors",
        Kind.ONNX: onnx,
        Kind.BUNDLE: bundle,
        Kind.SENSITIVITY_JSON: root / "s.json",
        Kind.HEATMAP_PNG: root / "s.png",
    }


def test_every_kind_is_recognised_with_its_provenance(cllm_outputs: dict[Kind, Path]) -> None:
    for kind, path in cllm_outputs.items():
        found = inspect_output(path)
        assert found is not None and found.kind == kind, path
        assert found.provenance.get("op") in ("export", "sensitivity"), kind


def test_foreign_things_are_not_cllm_outputs(tiny_model: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("mine")
    not_cllm_json = tmp_path / "x.json"
    not_cllm_json.write_text('{"provenance": {"op": "mine"}}')
    for path in (tiny_model, plain, plain / "notes.txt", not_cllm_json, _png(tmp_path / "a.png")):
        assert inspect_output(path) is None, path  # tiny_model: an HF folder, no provenance
    assert inspect_output(tmp_path / "absent") is None


def test_legacy_sensitivity_outputs_count_as_cllm_but_not_up_to_date(tmp_path: Path) -> None:
    keys = {"candidates": [], "layers": 0, "kld": [], "layer_params": [], "model_sha256": "0"}
    (tmp_path / "s.json").write_text(json.dumps({**keys, "params": {}}))
    png = _png(tmp_path / "s.png")  # unmarked, but written beside a cllm sensitivity JSON
    for path, kind in ((tmp_path / "s.json", Kind.SENSITIVITY_JSON), (png, Kind.HEATMAP_PNG)):
        check = check_output(path, kind)
        assert check.exists and not check.up_to_date(_prov("sensitivity")["id"])


def test_png_mark_round_trips_and_keeps_the_image(tmp_path: Path) -> None:
    png = _png(tmp_path / "a.png")
    before = png.read_bytes()
    mark_png(png, {"id": "abc", "op": "sensitivity"})
    after = png.read_bytes()
    assert after.startswith(before[:-12]) and after.endswith(before[-12:])  # IEND still last
    assert json.loads(png_text(png)["cllm.provenance"])["id"] == "abc"


def test_check_output_refuses_foreign_and_other_kinds(
    cllm_outputs: dict[Kind, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "mydir"
    folder.mkdir()
    (folder / "keep.txt").write_text("precious")
    with pytest.raises(UsageError) as exc:
        check_output(folder, Kind.GGUF, "-o mydir")
    assert exc.value.one_line() == (
        "-o mydir is an existing folder that cllm did not write. Choose another path or remove it."
    )
    f = tmp_path / "f.gguf"
    f.write_bytes(b"GGUF not really")
    with pytest.raises(UsageError, match="is an existing file that cllm did not write"):
        check_output(f, Kind.GGUF)
    with pytest.raises(UsageError, match="is a cllm GGUF file, not the HF folder"):
        check_output(cllm_outputs[Kind.GGUF], Kind.HF_FOLDER)
    with pytest.raises(UsageError, match="cllm did not write"):
        check_output(tmp_path, Kind.HF_FOLDER)  # a folder, even one holding cllm outputs


def test_check_output_same_kind_up_to_date_or_stale(cllm_outputs: dict[Kind, Path]) -> None:
    path = cllm_outputs[Kind.HF_FOLDER]
    prov = inspect_output(path).provenance  # type: ignore[union-attr]
    check = check_output(path, Kind.HF_FOLDER)
    assert check.exists and check.up_to_date(prov["id"]) and not check.up_to_date("other")
    free = check_output(path.parent / "free", Kind.HF_FOLDER)
    assert not free.exists and not free.up_to_date(prov["id"])


def test_atomic_path_never_replaces_a_foreign_folder(tmp_path: Path) -> None:
    """The last line of defence: even if a command skipped check_output, the rename refuses."""
    dest = tmp_path / "mydir"
    dest.mkdir()
    (dest / "keep.txt").write_text("precious")
    before = _snapshot(dest)
    with pytest.raises(UsageError, match="cllm did not write"), atomic_path(dest) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
    assert _snapshot(dest) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mydir"], "temporary left behind"


def test_atomic_path_replaces_a_cllm_output_of_the_same_kind_only(
    tiny_model: Path, cllm_outputs: dict[Kind, Path], tmp_path: Path
) -> None:
    import shutil

    from cllm.formats.checkpoint import open_checkpoint
    from cllm.formats.save import plan_tensors, save_hf_folder

    ckpt = open_checkpoint(tiny_model)
    dest = tmp_path / "hf"
    shutil.copytree(cllm_outputs[Kind.HF_FOLDER], dest)
    prov = _prov(to="y")
    save_hf_folder(dest, ckpt.config, plan_tensors(ckpt), ckpt.tokenizer_dir(), prov, {})
    assert inspect_output(dest).provenance["id"] == prov["id"]  # type: ignore[union-attr]
    gguf = tmp_path / "m.gguf"
    shutil.copyfile(cllm_outputs[Kind.GGUF], gguf)
    before = _snapshot(gguf)
    with pytest.raises(UsageError, match="not the HF folder"):
        save_hf_folder(gguf, ckpt.config, plan_tensors(ckpt), ckpt.tokenizer_dir(), prov, {})
    assert _snapshot(gguf) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m.gguf"]


# -- leftovers of killed runs --------------------------------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _leftover(dest: Path, record: dict | None, tag: str = "") -> Path:
    tmp = make_temp_dir(dest, tag)
    if record is None:
        (tmp / OWNER_FILE).unlink()
    else:
        (tmp / OWNER_FILE).write_text(json.dumps(record))
    (tmp / dest.name).write_bytes(b"half written")
    return tmp


def test_only_leftovers_of_dead_owners_of_that_path_are_removed(tmp_path: Path) -> None:
    dest = tmp_path / "m.gguf"
    me = owner_record()
    dead = _leftover(dest, {**me, "pid": _dead_pid()})
    work = _leftover(dest, {**me, "pid": _dead_pid()}, "work-")  # the ONNX export's work folder
    reused = _leftover(
        dest, {**me, "start": -1} if me["start"] is not None else {**me, "boot": "x"}
    )
    live = _leftover(dest, me)
    unknown = _leftover(dest, None)
    remote = _leftover(dest, {**me, "pid": _dead_pid(), "host": "elsewhere"})
    other = _leftover(tmp_path / "m.gguf.x", {**me, "pid": _dead_pid()})  # another output's
    assert {t.path for t in stale_temporaries(dest)} == {dead, work, reused}
    removed = remove_stale_temporaries(dest)
    assert {t.path for t in removed} == {dead, work, reused}
    assert not dead.exists() and not work.exists() and not reused.exists()
    assert live.exists() and unknown.exists() and remote.exists() and other.exists()


def test_a_killed_writer_leaves_a_temporary_the_next_write_removes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real SIGKILL in the middle of atomic_path, then the next write to the same path."""
    dest = tmp_path / "out.bin"
    child = start_atomic_writer(dest)
    try:
        stale = stale_temporaries(dest)
        assert stale == []  # its owner is alive: not touched
        left = [p for p in tmp_path.iterdir() if p.name.startswith(".out.bin.")]
        assert len(left) == 1
        record = json.loads((left[0] / OWNER_FILE).read_text())
        assert record["pid"] == child.pid
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not dest.exists() and left[0].exists()
    assert [t.path for t in stale_temporaries(dest)] == left
    with caplog.at_level("WARNING", logger="cllm"), atomic_path(dest) as tmp:
        tmp.write_bytes(b"whole")
    assert dest.read_bytes() == b"whole"
    assert [r.getMessage() for r in caplog.records] == [
        f"removed {left[0].name} beside {tmp_path}: a temporary left by cllm process "
        f"{child.pid}, which is no longer running"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
