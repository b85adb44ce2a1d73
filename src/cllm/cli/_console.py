"""Global CLI state and the two consoles: logs, warnings and progress on stderr, human
tables on stdout. Free of torch, so that `cllm --help` starts fast."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rich.console import Console


@dataclass
class State:
    json: bool = False
    quiet: bool = False
    verbose: int = 0
    color: str = "auto"
    debug: bool = False


STATE = State()


def debug_enabled() -> bool:
    return STATE.debug or os.environ.get("CLLM_DEBUG", "") not in ("", "0")


def _no_color() -> bool:
    if STATE.color == "never":
        return True
    if STATE.color == "always":
        return False
    return bool(os.environ.get("NO_COLOR"))


def err_console() -> Console:
    """Logs, warnings and progress: always stderr, colour only when allowed."""
    force = True if STATE.color == "always" else None
    return Console(
        stderr=True, no_color=_no_color(), force_terminal=force, highlight=False, soft_wrap=True
    )


def out_console(min_width: int | None = None) -> Console:
    """stdout for human tables. `min_width` widens a wide table written to a file or pipe
    (where rich would assume 80 columns and fold every cell)."""
    force = True if STATE.color == "always" else None
    width = min_width if min_width and not sys.stdout.isatty() else None
    return Console(
        no_color=_no_color(), force_terminal=force, highlight=False, soft_wrap=True, width=width
    )


def log(message: str, level: int = 0) -> None:
    """A status line on stderr; level 1 needs -v. Silenced by -q."""
    if STATE.quiet or level > STATE.verbose:
        return
    err_console().print(message, markup=False)


def warn(message: str) -> None:
    if STATE.quiet:
        return
    err_console().print(f"warning: {message}", style="yellow", markup=False)


class _WarnHandler(logging.Handler):
    """core/ and formats/ never print: what they log on the "cllm" logger reaches the user on
    stderr, warnings (a fallback taken, a leftover removed) as `warning:` lines, info (an
    alias converted on first use) as status lines."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            warn(record.getMessage())
        else:
            log(record.getMessage())


def route_library_warnings() -> None:
    logger = logging.getLogger("cllm")
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, _WarnHandler) for h in logger.handlers):
        logger.addHandler(_WarnHandler(logging.INFO))


class CliEvents:
    """What core's job pipeline shows the user: status lines, warnings, progress bars."""

    def log(self, message: str, level: int = 0) -> None:
        log(message, level)

    def warn(self, message: str) -> None:
        warn(message)

    def progress(self, description: str, total: int | None) -> Any:
        return progress(description, total)


EVENTS = CliEvents()


def progress_enabled() -> bool:
    return not STATE.quiet and sys.stderr.isatty()


@contextmanager
def progress(description: str, total: int | None) -> Iterator[Callable[..., None]]:
    """A rich progress bar on stderr when it is a TTY; a no-op otherwise."""
    if not progress_enabled():
        yield lambda *a, **k: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console(),
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=total)

        def advance(*_args: Any, description: str | None = None, **_kw: Any) -> None:
            bar.update(task, advance=1, description=description or bar.tasks[0].description)

        yield advance


def use_json(local: bool) -> bool:
    return local or STATE.json
