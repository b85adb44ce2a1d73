"""The only place a command exits on an error: one line on stderr and a documented exit code
(DESIGN.md section 3), a traceback only with --debug."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from cllm.cli._console import debug_enabled
from cllm.errors import EXIT_INTERRUPTED, CllmError

F = TypeVar("F", bound=Callable[..., Any])


def fail(cmd: str, message: str, code: int) -> None:
    sys.stderr.write(f"cllm {cmd}: error: {message}\n")
    sys.stderr.flush()
    raise typer.Exit(code)


def handle_errors(cmd: str) -> Callable[[F], F]:
    """Turn CllmError (and anything unexpected) into one stderr line and an exit code."""

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except typer.Exit:
                raise
            except CllmError as exc:
                if debug_enabled():
                    raise
                fail(cmd, exc.one_line(), exc.exit_code)
            except KeyboardInterrupt:
                sys.stderr.write(f"cllm {cmd}: interrupted\n")
                raise typer.Exit(EXIT_INTERRUPTED) from None
            except MemoryError:
                if debug_enabled():
                    raise
                fail(cmd, "out of memory. Try a smaller model or fewer chunks.", 1)
            except OSError as exc:
                if debug_enabled():
                    raise
                where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
                fail(cmd, f"{exc.strerror or exc}{where}. Check the path and free disk space.", 1)
            except Exception as exc:  # noqa: BLE001 - last line of defence: never a bare traceback
                if debug_enabled():
                    raise
                fail(
                    cmd,
                    f"unexpected {type(exc).__name__}: {exc}. Re-run with --debug for a traceback and report it.",
                    1,
                )

        return wrapper  # type: ignore[return-value]

    return deco
