"""The `cllm` command line. Thin: parse flags, call core, emit results.

Importing this module must not import torch, transformers or onnxruntime.
"""

from __future__ import annotations

import os
import sys
from enum import Enum

import typer

try:  # typer >= 0.29 vendors its own click
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover - older typer uses the click package
    from click import exceptions as click_exc  # type: ignore[no-redef]

from cllm import __version__
from cllm.cli._console import STATE, debug_enabled, route_library_warnings
from cllm.cli.bench import bench_cmd
from cllm.cli.distill import distill_cmd
from cllm.cli.eval import eval_cmd
from cllm.cli.export import export_cmd
from cllm.cli.info import info
from cllm.cli.prune import prune_cmd
from cllm.cli.quantize import quantize_cmd
from cllm.cli.report import report_cmd
from cllm.errors import EXIT_INTERRUPTED, EXIT_USAGE

EPILOG = (
    "Exit codes: 0 success, 1 runtime failure, 2 usage error or malformed input, "
    "3 a quality check failed (--fail-under, --max-kld), 130 interrupted. "
    "Stdout carries only data (paths or JSON); logs go to stderr."
)


class Color(str, Enum):
    auto = "auto"
    always = "always"
    never = "never"


app = typer.Typer(
    name="cllm",
    help="Compress large language models: composable commands that read and write safetensors and GGUF.",
    epilog=EPILOG,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"cllm {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _global(
    json_: bool = typer.Option(False, "--json", help="Machine-readable output (NDJSON) on stdout."),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="No logs or progress on stderr, only errors."
    ),
    verbose: int = typer.Option(
        0, "--verbose", "-v", count=True, help="More detail on stderr (repeatable)."
    ),
    color: Color = typer.Option(
        Color.auto, "--color", help="Colour on stderr: auto (honours NO_COLOR), always, never."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks (also CLLM_DEBUG=1)."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Global options; they go before the command name."""
    STATE.json = json_
    STATE.quiet = quiet
    STATE.verbose = verbose
    STATE.color = color.value
    STATE.debug = debug
    route_library_warnings()


app.command("info")(info)
app.command("eval")(eval_cmd)
app.command("export")(export_cmd)
app.command("quantize")(quantize_cmd)
app.command("prune")(prune_cmd)
app.command("distill")(distill_cmd)
app.command("bench")(bench_cmd)
app.command("report")(report_cmd)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: click's usage errors become one line and exit code 2."""
    command = typer.main.get_command(app)
    if os.environ.get("_CLLM_COMPLETE"):
        # add_completion=False leaves Typer's shell classes unregistered; the scripts in
        # completions/ (python -m cllm.gen) call back here with _CLLM_COMPLETE=complete_<shell>.
        from typer.completion import completion_init

        completion_init()
    args = sys.argv[1:] if argv is None else argv
    try:
        rv = command.main(args=args, prog_name="cllm", standalone_mode=False)
    except click_exc.NoArgsIsHelpError as exc:
        sys.stdout.write(exc.ctx.get_help() + "\n")
        sys.exit(0)
    except click_exc.UsageError as exc:
        sub = exc.ctx.info_name if exc.ctx is not None and exc.ctx.parent is not None else None
        where = f"cllm {sub}" if sub else "cllm"
        msg = exc.format_message().rstrip(".")
        sys.stderr.write(f"{where}: error: {msg}. Run '{where} --help' for usage.\n")
        sys.exit(EXIT_USAGE)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.stderr.write("cllm: interrupted\n")
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        if debug_enabled():
            raise
        sys.stderr.write("cllm: interrupted\n")
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(rv if isinstance(rv, int) else 0)
