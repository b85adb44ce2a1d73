"""Content hashes for provenance and cache keys, remembered by (path, size, mtime)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from cllm.paths import cache_dir

_CHUNK = 1 << 22


def _index_path() -> Path:
    return cache_dir() / "hashes.json"


def _load_index() -> dict[str, str]:
    try:
        return json.loads(_index_path().read_text())
    except (OSError, ValueError):
        return {}


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes; cached so a 500 MB model is hashed once."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    index = _load_index()
    if key in index:
        return index[key]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(_CHUNK)
            if not block:
                break
            h.update(block)
    digest = h.hexdigest()
    index[key] = digest
    if len(index) > 5000:
        index = dict(list(index.items())[-2500:])
    tmp = _index_path().with_suffix(f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(index))
        os.replace(tmp, _index_path())
    except OSError:
        pass
    return digest


def artifact_files(path: Path) -> list[Path]:
    """The files an artifact is made of: the file itself, or every file under a folder
    (ONNX exports, bundles), in a stable order."""
    path = Path(path)
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def files_sha256(paths: list[Path]) -> str:
    """One hash for a multi-file checkpoint: the hash of its files' names and hashes."""
    if len(paths) == 1:
        return file_sha256(paths[0])
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda q: q.name):
        h.update(p.name.encode() + b"\0" + file_sha256(p).encode() + b"\n")
    return h.hexdigest()


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
