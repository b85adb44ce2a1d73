"""Temporaries that killed runs leave beside an output, and which of them may go.

Every temporary folder (`.NAME.XXXXXXXX.tmp` beside NAME) records its owner: pid, the
process start time (a reused pid is then not mistaken for the owner), boot id and host.
A `kill -9` leaves the temporary behind; the next run writing NAME removes those whose
owner is gone (`remove_stale_temporaries`). Temporaries of a live owner, of another host,
or without a record (unknown origin) are left alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OWNER_FILE = ".cllm-owner.json"  # inside the temporary folder, beside the output being built


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) from /proc/<pid>/stat; None without /proc."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: fields 3.. follow the last ')'
    rest = raw.rsplit(")", 1)[-1].split()
    try:
        return rest[0], int(rest[19])  # field 3: state; field 22: starttime
    except (IndexError, ValueError):
        return None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def owner_record(pid: int | None = None) -> dict[str, Any]:
    """What identifies a running process across pid reuse and reboots."""
    pid = os.getpid() if pid is None else pid
    stat = _proc_stat(pid)
    return {
        "pid": pid,
        "start": stat[1] if stat else None,
        "boot": _boot_id(),
        "host": socket.gethostname(),
    }


def owner_alive(record: dict[str, Any]) -> bool:
    """False only when the owner is known to be gone; anything unclear counts as alive."""
    pid = record.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return True  # not a record this module wrote: leave it alone
    if record.get("host") != socket.gethostname():
        return True  # a shared file system: another machine's processes cannot be seen
    boot = _boot_id()
    if record.get("boot") and boot and record["boot"] != boot:
        return False  # the machine restarted since: every process of that boot is gone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    except OSError:
        return True
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, start = stat
    if state == "Z":
        return False  # killed, not yet reaped by its parent
    return not (isinstance(record.get("start"), int) and record["start"] != start)


def make_temp_dir(dest: Path, tag: str = "") -> Path:
    """A folder `.NAME.<tag>XXXXXXXX.tmp` beside `dest`, holding its owner record."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{tag}", suffix=".tmp", dir=dest.parent))
    (tmp / OWNER_FILE).write_text(json.dumps(owner_record()))
    return tmp


@dataclass(frozen=True)
class Leftover:
    """A temporary a killed run left beside an output, and the process that made it."""

    path: Path
    pid: int


def _temporaries(dest: Path) -> Iterator[Path]:
    """The temporaries of exactly `dest` (not of `dest.name + ".x"`: the random part has no dot)."""
    pattern = re.compile(r"\." + re.escape(dest.name) + r"\.(?:work-)?[a-z0-9_]+\.tmp")
    try:
        entries = list(dest.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        if pattern.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            yield entry


def stale_temporaries(dest: Path) -> list[Leftover]:
    """Temporaries beside `dest` whose recorded owner is no longer running."""
    found = []
    for tmp in _temporaries(Path(dest)):
        try:
            record = json.loads((tmp / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # no record: unknown origin, not ours to delete
        if isinstance(record, dict) and not owner_alive(record):
            found.append(Leftover(tmp, int(record["pid"])))
    return found


def remove_stale_temporaries(dest: Path) -> list[Leftover]:
    """Delete what killed runs left beside `dest`; returns what was removed, for the caller
    to report (formats never print)."""
    removed = []
    for left in stale_temporaries(dest):
        shutil.rmtree(left.path, ignore_errors=True)
        if not left.path.exists():
            removed.append(left)
    return removed


def describe_leftover(left: Leftover) -> str:
    """The one line that says a leftover was removed (shared by the CLI and the log)."""
    return (
        f"removed {left.path.name} beside {left.path.parent}: a temporary left by cllm "
        f"process {left.pid}, which is no longer running"
    )
