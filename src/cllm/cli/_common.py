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
from typing import Any, TypeVar

import typer
from rich.console import Console

from cllm.errors import EXIT_INTERRUPTED, CllmError

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


def emit_result(result: Any, as_json: bool) -> None:
    """stdout for a `JobResult`: the planned paths (--dry-run), or each artifact's record."""
    for art in result.artifacts:
        if result.status == "planned":
            emit_plan(art.path, result.params, as_json)
        else:
            emit_artifact(
                art.path, art.fmt, result.op, result.params, result.parent_sha256, as_json
            )


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


JSON_OPTION = typer.Option(False, "--json", help="Write machine-readable JSON (NDJSON) to stdout.")
FORCE_OPTION = typer.Option(
    False, "--force", "-f", help="Redo the work even if an identical output exists."
)
DRY_RUN_OPTION = typer.Option(False, "--dry-run", help="Print the planned output path and exit.")


# calibration options every calibrated method shares (quantize's and prune's)
CALIB_OPTION = typer.Option(
    None,
    "--calib",
    help="Calibration text [default: $CLLM_DATA_DIR/calibration/wikitext-2-valid.tokens].",
)
CALIB_SAMPLES_OPTION = typer.Option(128, "--calib-samples", help="Calibration sequences.")
CALIB_SEQLEN_OPTION = typer.Option(512, "--calib-seqlen", help="Tokens per calibration sequence.")
SEED_OPTION = typer.Option(0, "--seed", help="Seed for choosing calibration windows.")
CALIB_DTYPE_OPTION = typer.Option(
    "auto",
    "--calib-dtype",
    help="Calibration forward passes in auto (bf16 where the CPU has it), fp32 or bf16.",
)
SENSITIVITY_CHUNKS_OPTION = typer.Option(
    2, "--sensitivity-chunks", help="512-token chunks of calibration text per measurement."
)


def output_option(default_name: str) -> Any:
    return typer.Option(
        None, "--output", "-o", help=f"Output path [default: {default_name} beside the input]."
    )
