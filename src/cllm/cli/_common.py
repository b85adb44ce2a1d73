"""What every command shares: global state, stderr console, output records, error handling.

This is the only layer that prints or exits. It must stay free of torch so that
`cllm --help` starts fast; heavy imports happen inside command bodies.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console

from cllm.errors import EXIT_INTERRUPTED, CllmError

if TYPE_CHECKING:
    from cllm.formats.outputs import OutputCheck

F = TypeVar("F", bound=Callable[..., Any])


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


def out_console() -> Console:
    force = True if STATE.color == "always" else None
    return Console(no_color=_no_color(), force_terminal=force, highlight=False, soft_wrap=True)


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
    """core/ and formats/ never print: what they log as a warning on the "cllm" logger (a
    fallback taken, a leftover removed) reaches the user as a `warning:` line on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        warn(record.getMessage())


def route_library_warnings() -> None:
    logger = logging.getLogger("cllm")
    if not any(isinstance(h, _WarnHandler) for h in logger.handlers):
        logger.addHandler(_WarnHandler(logging.WARNING))


def progress_enabled() -> bool:
    return not STATE.quiet and sys.stderr.isatty()


@contextmanager
def progress(description: str, total: int | None) -> Iterator[Callable[..., None]]:
    """A rich progress bar on stderr when it is a TTY; a no-op otherwise."""
    if not progress_enabled():
        yield lambda *a, **k: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console(),
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=total)

        def advance(*_args: Any, description: str | None = None, **_kw: Any) -> None:
            bar.update(task, advance=1, description=description or bar.tasks[0].description)

        yield advance


def use_json(local: bool) -> bool:
    return local or STATE.json


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


def default_output(
    spec_path: Path, is_alias: bool, alias: str, op: str, digest: str, ext: str
) -> Path:
    """`<stem>.<op>-<hash>.<ext>` beside the input (in the current folder for an alias)."""
    if is_alias:
        return Path.cwd() / f"{alias}.{op}-{digest[:8]}{ext}"
    stem = spec_path.name
    for suffix in (".safetensors", ".gguf"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return spec_path.parent / f"{stem}.{op}-{digest[:8]}{ext}"


JSON_OPTION = typer.Option(False, "--json", help="Write machine-readable JSON (NDJSON) to stdout.")
FORCE_OPTION = typer.Option(
    False, "--force", "-f", help="Redo the work even if an identical output exists."
)
DRY_RUN_OPTION = typer.Option(False, "--dry-run", help="Print the planned output path and exit.")


def output_option(default_name: str) -> Any:
    return typer.Option(
        None, "--output", "-o", help=f"Output path [default: {default_name} beside the input]."
    )


def claim_output(
    checks: list[OutputCheck], pid: str, force: bool, named: bool, emit: Callable[[], None]
) -> bool:
    """After --dry-run, before the work: clear what killed runs left beside the outputs, then
    apply the Make-friendly rule. True when every output is there and up to date (printed
    again, no work); cllm outputs of the same kind made otherwise are rebuilt, with a warning
    when cllm chose the name. (`check_output` has already refused anything cllm may not
    replace.)"""
    from cllm.formats.leftovers import describe_leftover, remove_stale_temporaries

    for check in checks:
        for left in remove_stale_temporaries(check.path):
            warn(describe_leftover(left))
    if not force and all(check.up_to_date(pid) for check in checks):
        for check in checks:
            log(f"{check.path} is up to date (same input and parameters); --force redoes it")
        emit()
        return True
    for check in checks:
        if named and check.exists and not check.up_to_date(pid):
            warn(f"{check.path} exists with other provenance; overwriting")
    return False
