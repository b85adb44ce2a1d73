"""Provenance records: what made an output, so `cllm info` can show the whole chain.

The `id` is a hash of the parent's content hash, the operation and its full
parameters: two runs that would produce the same thing share it, which is how a
command recognises that an existing output is already up to date.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

import cllm


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    return {
        "cllm": cllm.__version__,
        "python": sys.version.split()[0],
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "safetensors": _version("safetensors"),
        "gguf": _version("gguf"),
        "llama-cpp-python": _version("llama-cpp-python"),
    }


def provenance_id(parent_sha256: str | None, op: str, params: dict[str, Any]) -> str:
    blob = json.dumps(
        {"parent": parent_sha256, "op": op, "params": params}, sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _created() -> str:
    """Now, or SOURCE_DATE_EPOCH when set (the reproducible-builds convention): with it, a
    deterministic step run twice writes byte-identical files (the recipes rely on this)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    when = (
        datetime.fromtimestamp(int(epoch), timezone.utc)
        if epoch.isdigit()
        else datetime.now(timezone.utc)
    )
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def make_provenance(
    op: str,
    params: dict[str, Any],
    parent_sha256: str | None,
    parent_provenance: dict[str, Any] | None,
    parent_path: str | None = None,
    command: list[str] | None = None,
    calibration: dict[str, Any] | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    return {
        "id": provenance_id(parent_sha256, op, params),
        "op": op,
        "params": params,
        "parent": {"sha256": parent_sha256, "path": parent_path, "provenance": parent_provenance},
        "calibration": calibration,
        "seed": seed,
        "command": command if command is not None else ["cllm", *sys.argv[1:]],
        "versions": versions(),
        "created": _created(),
    }


def chain(prov: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Newest first: this output's step, then its parent's, and so on."""
    out = []
    while isinstance(prov, dict):
        out.append(prov)
        parent = prov.get("parent") or {}
        prov = parent.get("provenance") if isinstance(parent, dict) else None
    return out
