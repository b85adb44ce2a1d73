"""llama.cpp's importance-matrix files: both layouts read as llama.cpp's own tools write
them (built here byte by byte from the published layout), written back, and recognised
as cllm's outputs only when cllm wrote them."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from cllm.errors import InputError
from cllm.formats.imatrix import Imatrix, read_imatrix, write_imatrix
from cllm.formats.outputs import Kind, inspect_output


def _legacy_bytes(entries: dict[str, tuple[int, np.ndarray]], chunks: int, dataset: str) -> bytes:
    """As llama-imatrix's save_imatrix_legacy lays it out: values = mean x² times ncall."""
    out = struct.pack("<i", len(entries))
    for name, (ncall, values) in entries.items():
        out += struct.pack("<i", len(name)) + name.encode()
        out += struct.pack("<ii", ncall, values.size) + values.astype("<f4").tobytes()
    out += struct.pack("<i", chunks) + struct.pack("<i", len(dataset)) + dataset.encode()
    return out


def test_reads_a_legacy_file_as_llama_quantize_does(tmp_path: Path) -> None:
    mean_q = np.array([0.5, 2.0, 8.0], dtype=np.float32)
    mean_d = np.array([1.0, 3.0], dtype=np.float32)
    path = tmp_path / "m.dat"
    path.write_bytes(
        _legacy_bytes(
            {"blk.0.attn_q.weight": (4, mean_q * 4), "blk.0.ffn_down.weight": (4, mean_d * 4)},
            chunks=4,
            dataset="wiki.train.raw",
        )
    )
    im = read_imatrix(path)
    assert im.names == ["blk.0.attn_q.weight", "blk.0.ffn_down.weight"]
    np.testing.assert_allclose(im.mean("blk.0.attn_q.weight"), mean_q, rtol=1e-6)
    np.testing.assert_allclose(im.mean("blk.0.ffn_down.weight"), mean_d, rtol=1e-6)
    assert im.datasets == ["wiki.train.raw"] and im.chunk_count == 4
    assert im.provenance is None
    assert inspect_output(path) is None  # not cllm's: never replaced


def test_reads_a_gguf_file_as_llama_imatrix_writes_it(tmp_path: Path) -> None:
    """Raw sums and token counts, one row per expert; an expert no token reached gets 1."""
    from gguf import GGUFWriter

    path = tmp_path / "m.gguf"
    w = GGUFWriter(path, arch="llama")
    w.kv_data[0].pop("general.architecture")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["calib.txt"])
    w.add_uint32("imatrix.chunk_count", 10)
    w.add_uint32("imatrix.chunk_size", 512)
    sums = np.array([[10.0, 20.0], [0.0, 0.0], [3.0, 6.0]], dtype=np.float32)
    w.add_tensor("blk.0.ffn_down_exps.weight.in_sum2", sums)
    w.add_tensor("blk.0.ffn_down_exps.weight.counts", np.array([[5.0], [0.0], [3.0]], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    im = read_imatrix(path)
    np.testing.assert_allclose(im.mean("blk.0.ffn_down_exps.weight"), [2, 4, 1, 1, 1, 2])
    assert (im.chunk_count, im.chunk_size, im.datasets) == (10, 512, ["calib.txt"])
    assert inspect_output(path) is None


@pytest.mark.parametrize("suffix", [".gguf", ".dat"])
def test_round_trip_keeps_values_and_provenance(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    im = Imatrix(
        {"blk.0.attn_q.weight": rng.random((1, 16), dtype=np.float32) * 50},
        {"blk.0.attn_q.weight": np.array([2048.0], np.float32)},
        ["wiki.valid.raw"],
        chunk_count=16,
        chunk_size=128,
        provenance={"op": "imatrix", "id": "abc"},
    )
    path = tmp_path / f"m{suffix}"
    write_imatrix(im, path)
    back = read_imatrix(path)
    np.testing.assert_allclose(
        back.mean("blk.0.attn_q.weight"), im.mean("blk.0.attn_q.weight"), rtol=1e-6
    )
    assert back.provenance == {"op": "imatrix", "id": "abc"}
    assert back.datasets == ["wiki.valid.raw"]
    found = inspect_output(path)
    assert found is not None and found.kind == Kind.IMATRIX and found.provenance["id"] == "abc"


def test_a_model_or_junk_is_not_an_importance_matrix(tmp_path: Path, tiny_ggufs: dict) -> None:
    with pytest.raises(InputError, match="not an importance matrix"):
        read_imatrix(next(iter(tiny_ggufs.values())))
    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"\xff\xff\xff\x7fhello")
    with pytest.raises(InputError, match="not an importance matrix"):
        read_imatrix(junk)
    short = tmp_path / "short.dat"
    short.write_bytes(_legacy_bytes({"a": (1, np.ones(4, np.float32))}, 1, "x")[:20])
    with pytest.raises(InputError):
        read_imatrix(short)
