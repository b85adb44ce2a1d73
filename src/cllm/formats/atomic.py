"""Atomic output: a failed or interrupted command never leaves a file at the output path.

Everything is written to a temporary name in the destination folder (same file
system, so the final rename is atomic), flushed and fsynced, then renamed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        fh.flush()
        os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success fsync it and rename it onto `dest`.

    Works for a file or a folder (an HF checkpoint folder is built in a temporary
    folder and renamed as a whole). On any exception the temporary is removed.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    target = tmp / dest.name
    try:
        yield target
        if target.is_dir():
            for root, _dirs, files in os.walk(target):
                for name in files:
                    fsync_file(Path(root) / name)
        elif target.exists():
            fsync_file(target)
        else:
            raise FileNotFoundError(f"nothing was written to {target}")
        if dest.is_dir() and not dest.is_symlink():
            old = tmp / (dest.name + ".old")
            os.replace(dest, old)
            os.replace(target, dest)
        else:
            os.replace(target, dest)
        _fsync_dir(dest.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
