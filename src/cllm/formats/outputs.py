"""What may be written over: the one place that decides whether an output path can be replaced.

The contract (DESIGN.md section 3): an output path is only ever replaced when it holds an
earlier cllm output of the same kind. Anything else at the path - a folder or file cllm did
not write, or a cllm output of another kind - is refused with a usage error before any work
starts, and nothing is touched; `--force` does not override this, because it means "redo my
work", not "delete what is not mine".

"Written by cllm" is read from the provenance every output carries, never from a file name:
a GGUF key or safetensors `__metadata__` entry `cllm.provenance`, the ONNX export's side file,
an edge bundle's manifest, a report folder's marker file `.cllm-report.json`, a sensitivity
JSON's `provenance`, and a `tEXt` chunk in the heat map PNG. Each reader here looks at headers
(and a report folder's listing) only, so checking costs milliseconds even for a large model,
and a malformed file simply counts as not cllm's.

`check_output` is what commands call before working; `ensure_replaceable` is the same rule
applied by `atomic_path` at rename time, as a last line of defence.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from cllm.errors import UsageError
from cllm.formats.checkpoint import parse_json_object

PROVENANCE_KEY = "cllm.provenance"  # the same key in GGUF, safetensors and the PNG text chunk
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BUNDLE_SCHEMA = "cllm.bundle/1"
REPORT_MARKER = ".cllm-report.json"  # in a report folder: schema, the files written, provenance
REPORT_SCHEMA = "cllm.report/1"
# the keys a sensitivity JSON has always carried: recognises those written before it held
# provenance (they count as cllm's, with no provenance id, so they are rebuilt, not reused)
SENSITIVITY_KEYS = frozenset({"candidates", "layers", "kld", "layer_params", "model_sha256"})
_MAX_JSON = 64 << 20  # a side file or manifest larger than this is not one cllm wrote


class Kind(str, Enum):
    """The kinds of output cllm writes; the value is how messages name them."""

    GGUF = "GGUF file"
    SAFETENSORS_FILE = "single-file safetensors"
    HF_FOLDER = "HF folder"
    ONNX = "ONNX export folder"
    BUNDLE = "edge bundle"
    REPORT = "report folder"
    SENSITIVITY_JSON = "sensitivity JSON"
    HEATMAP_PNG = "sensitivity heat map PNG"
    IMATRIX = "importance matrix"


@dataclass(frozen=True)
class Existing:
    """A cllm output found at a path: its kind and its provenance ({} when it records none)."""

    kind: Kind
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputCheck:
    """The verdict on an output path that may be written: empty, or a cllm output of the
    kind the command writes (anything else raised in `check_output`)."""

    path: Path
    kind: Kind
    existing: Existing | None

    def up_to_date(self, provenance_id: str) -> bool:
        """Make-friendly reuse: the output there was made from the same input and parameters."""
        return self.existing is not None and self.existing.provenance.get("id") == provenance_id

    @property
    def exists(self) -> bool:
        return self.existing is not None


def check_output(path: Path, kind: Kind, label: str | None = None) -> OutputCheck:
    """Before any work: may `path` receive a new output of `kind`?

    Returns the check (with the provenance of a same-kind cllm output already there, for the
    up-to-date rule); raises UsageError when the path holds anything else. `label` names the
    path in the message as the user gave it (e.g. "-o mydir").
    """
    path = Path(path)
    ensure_replaceable(path, kind, label)
    return OutputCheck(path, kind, inspect_output(path))


def ensure_replaceable(path: Path, kind: Kind | None, label: str | None = None) -> None:
    """Raise UsageError unless `path` is free or holds a cllm output of `kind` (of any kind
    when `kind` is None: the caller could not say what it writes, so only cllm's own outputs
    may go)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    name = label or str(path)
    if path.is_symlink() and path.is_dir():
        # a folder output is renamed into place, which cannot go through a link
        raise UsageError(
            f"{name} is a symbolic link to a folder, not a cllm output folder",
            "Choose another path or remove the link",
        )
    what = "folder" if path.is_dir() else "file"
    found = inspect_output(path)
    extra = _report_extras(path) if found is None and what == "folder" else None
    if extra:
        shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        raise UsageError(
            f"{name} is a cllm {Kind.REPORT.value} but also holds files cllm did not write "
            f"({shown})",
            "Move them out, or choose another path",
        )
    if found is None:
        raise UsageError(
            f"{name} is an existing {what} that cllm did not write",
            "Choose another path or remove it",
        )
    if kind is not None and found.kind != kind:
        raise UsageError(
            f"{name} is a cllm {found.kind.value}, not the {kind.value} this command writes",
            "Choose another path or remove it",
        )


def inspect_output(path: Path) -> Existing | None:
    """The cllm output at `path`, or None when there is nothing or something cllm did not write."""
    path = Path(path)
    try:
        if path.is_dir():
            return _inspect_folder(path)
        if path.is_file():
            return _inspect_file(path)
    except (OSError, ValueError, struct.error):
        return None  # unreadable: cannot be shown to be cllm's
    return None


def _inspect_folder(path: Path) -> Existing | None:
    report = _report_folder(path)
    if report is not None:
        return _inspect_report(path, *report)
    manifest = path / "manifest.json"
    if manifest.is_file():
        data = _json_object(manifest)
        prov = data.get("provenance") if data else None
        if data and data.get("schema") == BUNDLE_SCHEMA and isinstance(prov, dict):
            return Existing(Kind.BUNDLE, prov)
    from cllm.formats.onnx_io import MODEL_FILE, SIDE_FILE

    side = path / SIDE_FILE
    if (path / MODEL_FILE).is_file() and side.is_file():
        data = _json_object(side)
        prov = data.get("provenance") if data else None
        return Existing(Kind.ONNX, prov) if isinstance(prov, dict) else None
    if (path / "config.json").is_file():
        shards = sorted(path.glob("*.safetensors"), key=lambda p: p.name != "model.safetensors")
        for shard in shards:
            prov = _safetensors_provenance(shard)
            if prov is not None:
                return Existing(Kind.HF_FOLDER, prov)
    return None


def _report_folder(path: Path) -> tuple[dict[str, Any], list[str]] | None:
    """A report folder's marker and the entries it holds that the marker does not list;
    None when there is no valid marker (schema `cllm.report/1`, a list of `files`)."""
    marker = path / REPORT_MARKER
    if not marker.is_file():
        return None
    data = _json_object(marker)
    if (
        data is None
        or data.get("schema") != REPORT_SCHEMA
        or not isinstance(data.get("files"), list)
    ):
        return None
    listed = {str(f) for f in data["files"]} | {REPORT_MARKER}
    extra = sorted(
        n for n in (str(p.relative_to(path)) for p in path.rglob("*")) if n not in listed
    )
    return data, extra


def _inspect_report(path: Path, marker: dict[str, Any], extra: list[str]) -> Existing | None:
    """A report folder is cllm's only when it holds nothing its marker does not list (it is
    replaced as a whole, so anything added by hand would go with it). One missing a listed
    file is still cllm's, but with no provenance, so it is redrawn rather than reused."""
    if extra:
        return None
    prov = marker.get("provenance")
    complete = all((path / str(f)).is_file() for f in marker["files"])
    return Existing(Kind.REPORT, prov if isinstance(prov, dict) and complete else {})


def _report_extras(path: Path) -> list[str] | None:
    """What stops the folder at `path` from being a cllm report folder it otherwise is: the
    entries its marker does not list (None: not a report folder, or unreadable)."""
    try:
        report = _report_folder(path)
    except OSError:
        return None
    return report[1] if report is not None else None


def _inspect_file(path: Path) -> Existing | None:
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head == PNG_MAGIC:
        return _inspect_png(path)
    if head[:4] == b"GGUF":
        keys = _gguf_keys(path, (PROVENANCE_KEY, "general.type"))
        prov = parse_json_object(keys.get(PROVENANCE_KEY))
        if prov is None:
            return None
        return Existing(Kind.IMATRIX if keys.get("general.type") == "imatrix" else Kind.GGUF, prov)
    if path.suffix.lower() == ".dat":
        from cllm.formats.imatrix import dat_provenance

        prov = dat_provenance(path)
        return Existing(Kind.IMATRIX, prov) if prov is not None else None
    if head.lstrip()[:1] == b"{":
        data = _json_object(path)
        if data is None:
            return None
        prov = data.get("provenance")
        if isinstance(prov, dict) and prov.get("op") == "sensitivity":
            return Existing(Kind.SENSITIVITY_JSON, prov)
        if data.keys() >= SENSITIVITY_KEYS:
            return Existing(Kind.SENSITIVITY_JSON, {})
        return None
    prov = _safetensors_provenance(path)
    return Existing(Kind.SAFETENSORS_FILE, prov) if prov is not None else None


def _inspect_png(path: Path) -> Existing | None:
    text = png_text(path).get(PROVENANCE_KEY)
    if text is not None:
        prov = parse_json_object(text)
        return Existing(Kind.HEATMAP_PNG, prov or {})
    # a heat map from before PNGs were marked: cllm's when the JSON it was written beside is
    sibling = inspect_output(path.with_suffix(".json"))
    if sibling is not None and sibling.kind == Kind.SENSITIVITY_JSON:
        return Existing(Kind.HEATMAP_PNG, {})
    return None


def _json_object(path: Path) -> dict[str, Any] | None:
    if path.stat().st_size > _MAX_JSON:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _safetensors_provenance(path: Path) -> dict[str, Any] | None:
    from cllm.errors import InputError
    from cllm.formats.safetensors_io import read_header

    try:
        meta = read_header(path).metadata
    except InputError:
        return None
    return parse_json_object(meta.get(PROVENANCE_KEY))


def _gguf_keys(path: Path, wanted: tuple[str, ...]) -> dict[str, Any]:
    """Some scalar or string keys of a GGUF file, read by walking the key/value section with
    bounds checks (gguf-py would map the whole file and parse every tensor first)."""
    import mmap

    from cllm.errors import InputError
    from cllm.formats.gguf_io import _Cursor, _skip_value

    found: dict[str, Any] = {}
    if Path(path).stat().st_size < 24:
        return found
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        cur = _Cursor(mm, Path(path))
        try:
            cur.take(4, "magic")
            if cur.unpack("<I", "version") not in (2, 3):
                return found
            cur.unpack("<Q", "tensor count")
            n_kv = cur.unpack("<Q", "key/value count")
            for _ in range(min(n_kv, len(mm) // 13)):
                key = cur.string("a key name")
                vtype = cur.unpack("<I", f"type of key {key}")
                value = _skip_value(cur, vtype, key)
                if key in wanted:
                    found[key] = value
                    if len(found) == len(wanted):
                        break
        except InputError:
            return {}
        finally:
            del cur
            mm.close()
    return found


# -- PNG text chunks: how a heat map says who wrote it -------------------------------------


def png_text(path: Path) -> dict[str, str]:
    """The tEXt chunks of a PNG (keyword -> text); {} when it is not a well-formed PNG."""
    out: dict[str, str] = {}
    data = Path(path).read_bytes()
    if data[:8] != PNG_MAGIC:
        return out
    pos = 8
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        ctype = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if len(body) != length:
            break
        if ctype == b"tEXt" and b"\0" in body:
            key, _, text = body.partition(b"\0")
            out[key.decode("latin-1")] = text.decode("latin-1")
        if ctype == b"IEND":
            break
        pos += 12 + length
    return out


def mark_png(path: Path, provenance: dict[str, Any]) -> None:
    """Add a `cllm.provenance` tEXt chunk before IEND, so a later run knows the PNG is cllm's
    (viewers ignore text chunks; tEXt is Latin-1, so the JSON is written ASCII-only)."""
    data = Path(path).read_bytes()
    end = data.rfind(b"IEND")
    if data[:8] != PNG_MAGIC or end < 12:
        raise ValueError(f"{path} is not a PNG")
    body = PROVENANCE_KEY.encode() + b"\0" + json.dumps(provenance, sort_keys=True).encode()
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body
    chunk += struct.pack(">I", zlib.crc32(b"tEXt" + body) & 0xFFFFFFFF)
    start = end - 4  # the IEND chunk starts with its length field
    Path(path).write_bytes(data[:start] + chunk + data[start:])
