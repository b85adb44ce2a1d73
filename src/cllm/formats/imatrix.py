"""llama.cpp's importance-matrix files, read and written without llama.cpp.

An importance matrix says, for each weight matrix (by its GGUF tensor name), how large the
inputs of each of its columns are: the sum of x² over the calibration tokens and how many
tokens that sum is over. llama.cpp's quantizer takes the mean (sum / count) as per-column
weights in its scale search, and refuses its lowest-bit types without one.

Two file formats exist and both are read and written here, so a matrix made by cllm feeds
llama.cpp's `llama-quantize` and one made by `llama-imatrix` feeds `cllm quantize`:

- GGUF (llama.cpp since mid-2025): `general.type = imatrix`, keys `imatrix.datasets`,
  `imatrix.chunk_count`, `imatrix.chunk_size` (u32), and per matrix two F32 tensors,
  `<name>.in_sum2` (n_mat x n_cols sums) and `<name>.counts` (n_mat x 1 token counts; n_mat is
  the expert count of a mixture-of-experts tensor, else 1). cllm adds `cllm.provenance`.
- legacy `.dat`: int32 entry count, then per entry the name (int32 length + bytes), int32
  `ncall`, int32 `nval` and `nval` float32 values, which hold mean x² times `ncall` (readers
  divide by `ncall`); then optionally int32 chunk count and a dataset name. The format has no
  room for provenance, so cllm keeps its provenance in the dataset-name field, after a
  marker that `read_imatrix` recognises.

The overall scale of the values does not change what llama.cpp does with them.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cllm.errors import InputError

IMATRIX_TYPE = "imatrix"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
PROVENANCE_KEY = "cllm.provenance"
DAT_MARKER = "cllm.provenance="  # in a legacy file's dataset-name field
SUM_SUFFIX = ".in_sum2"
COUNT_SUFFIX = ".counts"


@dataclass
class Imatrix:
    """Per GGUF weight name: sums of x² per input column (n_mat x n_cols) and token counts."""

    sums: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    provenance: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for name, s in self.sums.items():
            c = self.counts.get(name)
            if s.ndim != 2 or c is None or c.shape != (s.shape[0],):
                raise InputError(f"importance matrix entry {name}: sums and counts do not match")

    @property
    def names(self) -> list[str]:
        return sorted(self.sums)

    def columns(self, name: str) -> int:
        return int(self.sums[name].shape[1])

    def mean(self, name: str) -> np.ndarray:
        """What llama.cpp's quantizer receives: per matrix, sum / count, and 1 for a matrix
        (an expert) no token reached. Flat, expert-major, float32."""
        s = self.sums[name].astype(np.float64)
        c = self.counts[name].astype(np.float64)[:, None]
        out = np.where(c > 0, s / np.where(c > 0, c, 1.0), 1.0)
        return out.astype(np.float32).reshape(-1)

    def digest(self) -> str:
        """sha256 of the content (names, sums, counts), not of a file: the same matrix read
        from GGUF or from .dat hashes alike when the values agree."""
        h = hashlib.sha256()
        for name in self.names:
            h.update(name.encode() + b"\0")
            h.update(np.ascontiguousarray(self.mean(name), dtype="<f4").tobytes())
        return h.hexdigest()

    def summary(self) -> dict[str, Any]:
        tokens = max((float(c.max()) for c in self.counts.values() if c.size), default=0.0)
        return {
            "sha256": self.digest(),
            "entries": len(self.sums),
            "tokens": int(tokens),
            "datasets": list(self.datasets),
        }


# -- reading ---------------------------------------------------------------------------------


def read_imatrix(path: Path | str) -> Imatrix:
    """A GGUF or legacy `.dat` importance matrix; InputError when it is neither."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise InputError(f"cannot read importance matrix {path}: {exc.strerror}") from exc
    if magic == b"GGUF":
        return _read_gguf(path)
    return _read_dat(path)


def _read_gguf(path: Path) -> Imatrix:
    from gguf import GGUFReader, GGUFValueType

    try:
        reader = GGUFReader(path)
    except (ValueError, struct.error, OSError) as exc:
        raise InputError(f"{path}: not a readable GGUF file ({exc})") from exc

    def value(key: str) -> Any:
        f = reader.fields.get(key)
        if f is None:
            return None
        if f.types and f.types[0] == GGUFValueType.ARRAY:
            return [bytes(f.parts[i]).decode("utf-8", "replace") for i in f.data]
        return f.contents()

    kind = value("general.type")
    if kind != IMATRIX_TYPE:
        raise InputError(
            f"{path} is a GGUF file but not an importance matrix (general.type {kind!r})",
            "Pass a file written by llama-imatrix or `cllm quantize --imatrix-out`",
        )
    tensors = {t.name: t for t in reader.tensors}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for tname, t in tensors.items():
        if not tname.endswith(SUM_SUFFIX):
            continue
        name = tname[: -len(SUM_SUFFIX)]
        c = tensors.get(name + COUNT_SUFFIX)
        if c is None:
            raise InputError(f"{path}: {name} has sums but no counts")
        if t.tensor_type.name != "F32" or c.tensor_type.name != "F32":
            raise InputError(f"{path}: sums and counts of {name} must be F32")
        n_cols = int(t.shape[0])
        s = np.asarray(t.data, dtype=np.float32).reshape(-1, n_cols)
        cnt = np.asarray(c.data, dtype=np.float32).reshape(-1)
        if cnt.shape[0] != s.shape[0]:
            raise InputError(f"{path}: {name} has {s.shape[0]} matrices but {cnt.shape[0]} counts")
        sums[name] = s.copy()
        counts[name] = np.round(cnt).astype(np.float32)  # llama.cpp rounds counts to integers
    if not sums:
        raise InputError(f"{path}: the importance matrix has no entries")
    prov = value(PROVENANCE_KEY)
    return Imatrix(
        sums,
        counts,
        datasets=list(value(KEY_DATASETS) or []),
        chunk_count=int(value(KEY_CHUNK_COUNT) or 0),
        chunk_size=int(value(KEY_CHUNK_SIZE) or 0),
        provenance=_json(prov) if isinstance(prov, str) else None,
    )


def _read_dat(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str, what: str) -> Any:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise InputError(
                f"{path}: {what} runs past the end of the file",
                "Not an importance matrix (llama.cpp .dat or GGUF), or a truncated one",
            )
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out[0] if len(out) == 1 else out

    def text(what: str) -> str:
        nonlocal pos
        n = take("<i", f"length of {what}")
        if n < 0 or n > len(data) - pos:
            raise InputError(f"{path}: {what} has an impossible length {n}")
        out = data[pos : pos + n].decode("utf-8", "replace")
        pos += n
        return out

    n_entries = take("<i", "entry count")
    if n_entries < 1 or n_entries * 12 > len(data):
        raise InputError(
            f"{path} is not an importance matrix (llama.cpp .dat or GGUF)",
            "Pass a file written by llama-imatrix or `cllm quantize --imatrix-out`",
        )
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for i in range(n_entries):
        name = text(f"the name of entry {i}")
        ncall = take("<i", f"call count of {name}")
        nval = take("<i", f"value count of {name}")
        if nval < 1 or pos + 4 * nval > len(data):
            raise InputError(f"{path}: entry {name} claims {nval} values, more than the file holds")
        values = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        # the quantize tool divides by ncall (if positive); keeping ncall as the count does
        # the same through `Imatrix.mean`
        sums[name] = values.reshape(1, -1).copy()
        counts[name] = np.array([max(ncall, 0) or 1], dtype=np.float32)
    chunk_count, datasets, prov = 0, [], None
    if pos < len(data):
        chunk_count = take("<i", "chunk count")
        if pos < len(data):
            name = text("the dataset name")
            if name.startswith(DAT_MARKER):
                prov = _json(name[len(DAT_MARKER) :]) or {}
                name = str(prov.pop("imatrix_dataset", ""))
            if name:
                datasets = [name]
    return Imatrix(sums, counts, datasets, chunk_count, 0, prov)


def _json(text: str) -> dict[str, Any] | None:
    try:
        out = json.loads(text)
    except ValueError:
        return None
    return out if isinstance(out, dict) else None


# -- writing ---------------------------------------------------------------------------------


def write_imatrix(im: Imatrix, path: Path, legacy: bool | None = None) -> None:
    """llama.cpp's legacy `.dat` format (`legacy`, by default when the name ends in .dat),
    GGUF otherwise. Writes `path` directly: callers wrap it in `atomic_path`."""
    if legacy is None:
        legacy = Path(path).suffix.lower() == ".dat"
    if legacy:
        _write_dat(im, Path(path))
    else:
        _write_gguf(im, Path(path))


def _write_gguf(im: Imatrix, path: Path) -> None:
    from gguf import GGUFWriter, Keys

    w = GGUFWriter(path, arch=IMATRIX_TYPE)
    w.kv_data[0].pop(Keys.General.ARCHITECTURE, None)  # llama.cpp's imatrix files have none
    w.add_type(IMATRIX_TYPE)
    w.add_array(KEY_DATASETS, list(im.datasets) or ["unknown"])
    w.add_uint32(KEY_CHUNK_COUNT, int(im.chunk_count))
    w.add_uint32(KEY_CHUNK_SIZE, int(im.chunk_size))
    if im.provenance is not None:
        w.add_string(PROVENANCE_KEY, json.dumps(im.provenance, sort_keys=True))
    for name in im.names:
        w.add_tensor(name + SUM_SUFFIX, np.ascontiguousarray(im.sums[name], dtype=np.float32))
        w.add_tensor(
            name + COUNT_SUFFIX,
            np.ascontiguousarray(im.counts[name], dtype=np.float32).reshape(-1, 1),
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _write_dat(im: Imatrix, path: Path) -> None:
    """As llama-imatrix writes it: ncall = chunks of `chunk_size` tokens the largest count
    spans (at least 1), values = mean x² times ncall."""
    out = [struct.pack("<i", len(im.sums))]
    for name in im.names:
        c = im.counts[name]
        top = float(c.max()) if c.size else 0.0
        ncall = max(1, math.ceil(top / im.chunk_size)) if im.chunk_size > 0 else max(1, int(top))
        values = im.mean(name).astype(np.float64) * ncall
        raw = name.encode()
        out.append(struct.pack("<i", len(raw)) + raw)
        out.append(struct.pack("<ii", ncall, values.size))
        out.append(values.astype("<f4").tobytes())
    dataset = im.datasets[0] if im.datasets else ""
    if im.provenance is not None:
        dataset = DAT_MARKER + json.dumps(
            {**im.provenance, "imatrix_dataset": dataset}, sort_keys=True
        )
    raw = dataset.encode()
    out.append(struct.pack("<i", int(im.chunk_count)) + struct.pack("<i", len(raw)) + raw)
    path.write_bytes(b"".join(out))


def dat_provenance(path: Path) -> dict[str, Any] | None:
    """The provenance cllm keeps in a legacy file's dataset-name field, found by seeking
    past the entries (their values are not read); None for any other file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:

            def int32() -> int:
                raw = fh.read(4)
                if len(raw) != 4:
                    raise ValueError("truncated")
                return int(struct.unpack("<i", raw)[0])

            n = int32()
            if n < 1 or n * 12 > size:
                return None
            for _ in range(n):
                length = int32()
                if length < 0 or length > size:
                    return None
                fh.seek(length + 4, 1)  # the name and ncall
                nval = int32()
                if nval < 1 or fh.tell() + 4 * nval > size:
                    return None
                fh.seek(4 * nval, 1)
            if fh.tell() >= size:
                return None
            int32()  # chunk count
            length = int32()
            if length < len(DAT_MARKER) or fh.tell() + length > size:
                return None
            text = fh.read(length).decode("utf-8", "replace")
    except (OSError, ValueError):
        return None
    if not text.startswith(DAT_MARKER):
        return None
    prov = _json(text[len(DAT_MARKER) :])
    if prov is not None:
        prov.pop("imatrix_dataset", None)
    return prov
