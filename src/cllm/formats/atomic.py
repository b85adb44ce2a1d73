"""Atomic output: a failed or interrupted command never leaves a file at the output path.

Everything is written to a temporary name in the destination folder (same file
system, so the final rename is atomic), flushed and fsynced, then renamed.

Two rules keep this safe around other people's files and around killed runs:

- the rename only ever replaces a cllm output of the same kind (`outputs.ensure_replaceable`);
  commands check that before working, and it is checked again here at rename time, so a
  folder cllm did not write is never moved aside and deleted;
- every temporary folder records its owner, and the next run writing NAME removes what a
  killed run left (`cllm.formats.leftovers`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from cllm.formats.leftovers import describe_leftover, make_temp_dir, remove_stale_temporaries
from cllm.formats.outputs import Kind, ensure_replaceable, inspect_output

log = logging.getLogger("cllm")
log.addHandler(logging.NullHandler())  # a library logs; the application decides what is shown


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
def atomic_path(dest: Path, kind: Kind | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success fsync it and rename it onto `dest`.

    Works for a file or a folder (an HF checkpoint folder is built in a temporary
    folder and renamed as a whole). On any exception the temporary is removed. An existing
    `dest` is replaced only when it is a cllm output of `kind` (of the kind just written
    when `kind` is None); otherwise UsageError, and `dest` is left as it was.
    """
    dest = Path(dest)
    for left in remove_stale_temporaries(dest):
        log.warning(describe_leftover(left))
    tmp = make_temp_dir(dest)
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
        if dest.exists() or dest.is_symlink():
            written = kind
            if written is None:
                made = inspect_output(target)
                written = made.kind if made else None
            ensure_replaceable(dest, written)
        if dest.is_dir() and not dest.is_symlink():
            old = tmp / (dest.name + ".old")
            os.replace(dest, old)
            os.replace(target, dest)
        else:
            os.replace(target, dest)
        _fsync_dir(dest.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
