"""Malformed checkpoints for tests: each builder derives one bad input from a valid tiny model.

    src = make_sources(tmp / "src")            # a tiny HF folder and an F32 GGUF of it
    bad = MALFORMED["st_overlap"](src, tmp / "case")   # the path to hand to a command

Every builder takes the `Sources` and a destination folder (created if needed,
used for nothing else) and returns the path of the bad input inside it. The
sources are never modified. `MALFORMED` inputs must be refused when opened;
`NONFINITE` inputs open fine but hold a NaN in one tensor.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ST_FILE = "model.safetensors"
NAN = struct.pack("<f", float("nan"))


@dataclass(frozen=True)
class Sources:
    folder: Path  # valid HF folder: config.json, model.safetensors (F32), tokenizer
    gguf: Path  # valid F32 GGUF of the same model


def make_sources(root: Path) -> Sources:
    """Build the valid tiny model once under `root` (reused if already there)."""
    root = Path(root)
    src = Sources(root / "tiny", root / "tiny.F32.gguf")
    if not src.gguf.exists():
        from cllm.testing.tiny import save_tiny_llama

        save_tiny_llama(src.folder)
        write_valid_gguf(src.folder, src.gguf)
    return src


def write_valid_gguf(folder: Path, out: Path) -> Path:
    """What `cllm export <folder> --to gguf --gguf-type F32 -o <out>` writes."""
    from cllm.formats.checkpoint import open_checkpoint
    from cllm.formats.provenance import make_provenance
    from cllm.formats.save import save_gguf

    ckpt = open_checkpoint(folder)
    params = {"to": "gguf", "gguf_type": "F32"}
    prov = make_provenance("export", params, ckpt.sha256, ckpt.provenance, str(ckpt.path))
    save_gguf(Path(out), ckpt, "F32", prov)
    return Path(out)


# -- byte helpers -----------------------------------------------------------------
def copy_folder(src: Path, dest: Path, skip: tuple[str, ...] = ()) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.is_file() and p.name not in skip:
            shutil.copyfile(p, dest / p.name)
    return dest


def patch_bytes(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def read_safetensors(path: Path) -> tuple[dict[str, Any], bytes]:
    """(header as a dict, data bytes after the header)."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_safetensors(path: Path, header: dict[str, Any], data: bytes) -> None:
    raw = json.dumps(header).encode("utf-8")
    raw += b" " * ((8 - len(raw) % 8) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def edit_safetensors_header(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    header, data = read_safetensors(path)
    edit(header)
    write_safetensors(path, header, data)


@dataclass
class GGUFLayout:
    """Byte offsets of the fields a builder may patch (absolute, in the file).

    Fixed ones: magic at 0, u32 version at 4, u64 tensor count at 8, u64 kv count at 16.
    `kv`: key -> (its name's length field, its type, its value); `tensors`: name -> (its
    name's length field, its type, its offset field); `tensor_offsets`: name -> offset of its
    data after `data_start`.
    """

    kv: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    tensors: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    tensor_offsets: dict[str, int] = field(default_factory=dict)
    data_start: int = 0


_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_layout(path: Path) -> GGUFLayout:
    """Walk a valid GGUF v3 header (magic, u32 version, u64 counts, KVs, tensor infos)."""
    buf = Path(path).read_bytes()
    pos = 24

    def u32() -> int:
        nonlocal pos
        pos += 4
        return int(struct.unpack_from("<I", buf, pos - 4)[0])

    def u64() -> int:
        nonlocal pos
        pos += 8
        return int(struct.unpack_from("<Q", buf, pos - 8)[0])

    def string() -> str:
        nonlocal pos
        n = u64()
        pos += n
        return buf[pos - n : pos].decode("utf-8")

    def skip(vtype: int) -> int | None:
        nonlocal pos
        if vtype in _SCALARS:
            pos += _SCALARS[vtype]
            if vtype in (4, 5, 10, 11):
                fmt = {4: "<I", 5: "<i", 10: "<Q", 11: "<q"}[vtype]
                return int(struct.unpack_from(fmt, buf, pos - _SCALARS[vtype])[0])
        elif vtype == 8:
            string()
        elif vtype == 9:
            etype, count = u32(), u64()
            for _ in range(count):
                skip(etype)
        else:
            raise ValueError(f"unknown GGUF value type {vtype}")
        return None

    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
    layout = GGUFLayout()
    alignment = 32
    for _ in range(n_kv):
        at = pos
        key = string()
        type_at = pos
        vtype = u32()
        value_at = pos
        value = skip(vtype)
        layout.kv[key] = (at, type_at, value_at)
        if key == "general.alignment" and value:
            alignment = value
    for _ in range(n_tensors):
        at = pos
        name = string()
        n_dims = u32()
        pos += 8 * n_dims
        type_at = pos
        u32()
        offset_at = pos
        layout.tensor_offsets[name] = u64()
        layout.tensors[name] = (at, type_at, offset_at)
    layout.data_start = -(-pos // alignment) * alignment
    return layout


def _gguf_copy(src: Sources, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / "model.gguf"
    shutil.copyfile(src.gguf, out)
    return out


def _st_copy(src: Sources, dest: Path) -> Path:
    return copy_folder(src.folder, dest) / ST_FILE


# -- malformed: refused by open_checkpoint ------------------------------------------
def missing_file(src: Sources, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    return dest / "does-not-exist.safetensors"


def folder_without_config(src: Sources, dest: Path) -> Path:
    return copy_folder(src.folder, dest, skip=("config.json",))


def st_truncated(src: Sources, dest: Path) -> Path:
    """The file cut in half: the header is intact, the tensor data is not."""
    path = _st_copy(src, dest)
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    return path


def st_tiny(src: Sources, dest: Path) -> Path:
    """A file shorter than the 8-byte header length."""
    path = _st_copy(src, dest)
    with open(path, "r+b") as fh:
        fh.truncate(5)
    return path


def st_header_too_long(src: Sources, dest: Path) -> Path:
    path = _st_copy(src, dest)
    patch_bytes(path, 0, struct.pack("<Q", path.stat().st_size * 4))
    return path


def st_header_not_json(src: Sources, dest: Path) -> Path:
    path = _st_copy(src, dest)
    patch_bytes(path, 8, b"\xffnot json at all")
    return path


def st_overlap(src: Sources, dest: Path) -> Path:
    """Layer 1's q_proj claims the same bytes as layer 0's (same shape, so sizes agree)."""
    path = _st_copy(src, dest)

    def edit(h: dict[str, Any]) -> None:
        a, b = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
        h[b]["data_offsets"] = list(h[a]["data_offsets"])

    edit_safetensors_header(path, edit)
    return path


def st_offsets_out_of_range(src: Sources, dest: Path) -> Path:
    """model.norm.weight moved past the end of the data (its byte count still fits its shape)."""
    path = _st_copy(src, dest)
    _, data = read_safetensors(path)

    def edit(h: dict[str, Any]) -> None:
        begin, end = h["model.norm.weight"]["data_offsets"]
        h["model.norm.weight"]["data_offsets"] = [len(data), len(data) + end - begin]

    edit_safetensors_header(path, edit)
    return path


def st_unknown_dtype(src: Sources, dest: Path) -> Path:
    path = _st_copy(src, dest)

    def edit(h: dict[str, Any]) -> None:
        h["model.norm.weight"]["dtype"] = "Q9_ZZ"

    edit_safetensors_header(path, edit)
    return path


def st_dtype_not_string(src: Sources, dest: Path) -> Path:
    """A dtype that is a JSON list, not a string."""
    path = _st_copy(src, dest)

    def edit(h: dict[str, Any]) -> None:
        h["model.norm.weight"]["dtype"] = ["F32"]

    edit_safetensors_header(path, edit)
    return path


def st_embedded_config_not_object(src: Sources, dest: Path) -> Path:
    """A single-file checkpoint whose embedded config is a JSON list."""
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "single.safetensors"
    shutil.copyfile(src.folder / ST_FILE, path)

    def edit(h: dict[str, Any]) -> None:
        h["__metadata__"] = {"format": "pt", "cllm.config": "[64, 2]"}

    edit_safetensors_header(path, edit)
    return path


def config_zero_heads(src: Sources, dest: Path) -> Path:
    """config.json with num_attention_heads 0 and no head_dim."""
    folder = copy_folder(src.folder, dest)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_attention_heads"] = 0
    cfg.pop("head_dim", None)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def config_shape_mismatch(src: Sources, dest: Path) -> Path:
    """config.json says vocab 300; the embedding holds 264 rows."""
    folder = copy_folder(src.folder, dest)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vocab_size"] = cfg["vocab_size"] + 36
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def gguf_bad_magic(src: Sources, dest: Path) -> Path:
    path = _gguf_copy(src, dest)
    patch_bytes(path, 0, b"GGUX")
    return path


def gguf_bad_version(src: Sources, dest: Path) -> Path:
    path = _gguf_copy(src, dest)
    patch_bytes(path, 4, struct.pack("<I", 99))
    return path


def gguf_too_many_tensors(src: Sources, dest: Path) -> Path:
    path = _gguf_copy(src, dest)
    patch_bytes(path, 8, struct.pack("<Q", 1 << 40))
    return path


def gguf_string_too_long(src: Sources, dest: Path) -> Path:
    """The value of general.architecture claims 2^40 bytes."""
    path = _gguf_copy(src, dest)
    _, _, value_at = gguf_layout(path).kv["general.architecture"]
    patch_bytes(path, value_at, struct.pack("<Q", 1 << 40))
    return path


def gguf_unknown_qtype(src: Sources, dest: Path) -> Path:
    path = _gguf_copy(src, dest)
    _, type_at, _ = gguf_layout(path).tensors["token_embd.weight"]
    patch_bytes(path, type_at, struct.pack("<I", 9999))
    return path


def gguf_truncated(src: Sources, dest: Path) -> Path:
    """Header intact, tensor data cut off."""
    path = _gguf_copy(src, dest)
    layout = gguf_layout(path)
    with open(path, "r+b") as fh:
        fh.truncate(layout.data_start + (path.stat().st_size - layout.data_start) // 2)
    return path


def gguf_header_truncated(src: Sources, dest: Path) -> Path:
    """Cut inside the key/value section, in the middle of the merges list."""
    path = _gguf_copy(src, dest)
    _, _, value_at = gguf_layout(path).kv["tokenizer.ggml.merges"]
    with open(path, "r+b") as fh:
        fh.truncate(value_at + 4 + 8 + 20)  # element type, count, then part of the strings
    return path


def gguf_string_not_utf8(src: Sources, dest: Path) -> Path:
    """The first byte of general.architecture's value is 0xff."""
    path = _gguf_copy(src, dest)
    _, _, value_at = gguf_layout(path).kv["general.architecture"]
    patch_bytes(path, value_at + 8, b"\xff")
    return path


def gguf_shape_mismatch(src: Sources, dest: Path) -> Path:
    """llama.embedding_length says 80; the tensors are 64 wide."""
    path = _gguf_copy(src, dest)
    _, _, value_at = gguf_layout(path).kv["llama.embedding_length"]
    patch_bytes(path, value_at, struct.pack("<I", 80))
    return path


# -- non-finite: opens, but one tensor holds a NaN ---------------------------------
NAN_TENSOR = "model.layers.1.mlp.down_proj.weight"
NAN_TENSOR_GGUF = "blk.1.ffn_down.weight"


def st_nonfinite(src: Sources, dest: Path) -> Path:
    """A copy of the HF folder with one NaN in layer 1's down_proj; returns the folder."""
    path = _st_copy(src, dest)
    header, data = read_safetensors(path)
    entry = header[NAN_TENSOR]
    if entry["dtype"] != "F32":
        raise ValueError(f"expected an F32 {NAN_TENSOR}, got {entry['dtype']}")
    data_start = path.stat().st_size - len(data)
    patch_bytes(path, data_start + entry["data_offsets"][0] + 4 * 7, NAN)
    return dest


def gguf_nonfinite(src: Sources, dest: Path) -> Path:
    """A copy of the F32 GGUF with one NaN in blk.1.ffn_down.weight."""
    path = _gguf_copy(src, dest)
    layout = gguf_layout(path)
    _, type_at, _ = layout.tensors[NAN_TENSOR_GGUF]
    (ttype,) = struct.unpack("<I", path.read_bytes()[type_at : type_at + 4])
    if ttype != 0:
        raise ValueError(f"expected an F32 (type 0) {NAN_TENSOR_GGUF}, got type {ttype}")
    patch_bytes(path, layout.data_start + layout.tensor_offsets[NAN_TENSOR_GGUF] + 4 * 7, NAN)
    return path


Builder = Callable[[Sources, Path], Path]

MALFORMED: dict[str, Builder] = {
    "missing_file": missing_file,
    "folder_without_config": folder_without_config,
    "st_truncated": st_truncated,
    "st_tiny": st_tiny,
    "st_header_too_long": st_header_too_long,
    "st_header_not_json": st_header_not_json,
    "st_overlap": st_overlap,
    "st_offsets_out_of_range": st_offsets_out_of_range,
    "st_unknown_dtype": st_unknown_dtype,
    "st_dtype_not_string": st_dtype_not_string,
    "st_embedded_config_not_object": st_embedded_config_not_object,
    "config_shape_mismatch": config_shape_mismatch,
    "config_zero_heads": config_zero_heads,
    "gguf_bad_magic": gguf_bad_magic,
    "gguf_bad_version": gguf_bad_version,
    "gguf_too_many_tensors": gguf_too_many_tensors,
    "gguf_string_too_long": gguf_string_too_long,
    "gguf_unknown_qtype": gguf_unknown_qtype,
    "gguf_truncated": gguf_truncated,
    "gguf_header_truncated": gguf_header_truncated,
    "gguf_string_not_utf8": gguf_string_not_utf8,
    "gguf_shape_mismatch": gguf_shape_mismatch,
}

NONFINITE: dict[str, Builder] = {
    "st_nonfinite": st_nonfinite,
    "gguf_nonfinite": gguf_nonfinite,
}


# A substring the one-line error for each malformed case must contain.
EXPECT: dict[str, str] = {
    "missing_file": "no such file or folder",
    "folder_without_config": "without config.json",
    "st_truncated": "outside the data",
    "st_tiny": "shorter than a safetensors header",
    "st_header_too_long": "is larger than the file",
    "st_header_not_json": "header is not valid JSON",
    "st_overlap": "overlap",
    "st_offsets_out_of_range": "tensor model.norm.weight lies at bytes",
    "st_unknown_dtype": "unknown dtype 'Q9_ZZ'",
    "st_dtype_not_string": "unknown dtype",
    "st_embedded_config_not_object": "embedded config",
    "config_shape_mismatch": "but config.json implies [300, 64]",
    "config_zero_heads": "num_attention_heads",
    "gguf_bad_magic": "is not a GGUF file",
    "gguf_bad_version": "GGUF version 99 is not supported",
    "gguf_too_many_tensors": "claims 1099511627776 tensors",
    "gguf_string_too_long": "runs past the end of the file",
    "gguf_unknown_qtype": "unknown quantization type 9999",
    "gguf_truncated": "lies outside the file",
    "gguf_header_truncated": "runs past the end of the file",
    "gguf_string_not_utf8": "not UTF-8",
    "gguf_shape_mismatch": "but config.json implies [264, 80]",
}


def build_all(src: Sources, root: Path) -> dict[str, Path]:
    """Every bad input, each in its own folder under `root`."""
    return {name: fn(src, Path(root) / name) for name, fn in {**MALFORMED, **NONFINITE}.items()}
