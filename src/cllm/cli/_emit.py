"""stdout carries data only: the paths a command wrote, or one NDJSON record per artifact."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def emit_result(result: Any, as_json: bool) -> None:
    """stdout for a `JobResult`: the planned paths (--dry-run), or each artifact's record."""
    for art in result.artifacts:
        if result.status == "planned":
            emit_plan(art.path, result.params, as_json)
        else:
            emit_artifact(
                art.path, art.fmt, result.op, result.params, result.parent_sha256, as_json
            )


def emit_artifact(
    path: Path, fmt: str, op: str, params: dict[str, Any], parent: str | None, as_json: bool
) -> None:
    """stdout gets data only: the artifact's path, or one NDJSON record."""
    path = Path(path)
    if as_json:
        from cllm.formats.hashing import artifact_files, file_sha256, files_sha256

        files = artifact_files(path)

        record = {
            "path": str(path),
            "format": fmt,
            "bytes": sum(p.stat().st_size for p in files),
            "sha256": file_sha256(path) if path.is_file() else files_sha256(files),
            "op": op,
            "params": params,
            "parent": parent,
        }
        sys.stdout.write(json.dumps(record, sort_keys=True) + "\n")
    else:
        sys.stdout.write(str(path) + "\n")
    sys.stdout.flush()


def emit_plan(path: Path, params: dict[str, Any], as_json: bool) -> None:
    """--dry-run: the path that would be written (or a JSON record marked planned)."""
    if as_json:
        emit_json({"path": str(path), "planned": True, "params": params})
    else:
        sys.stdout.write(f"{path}\n")
        sys.stdout.flush()


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()
