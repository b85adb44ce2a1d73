"""`cllm report`: eval and bench results into a folder of tables, Pareto plots and heat maps."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path

import typer

from cllm.cli._console import EVENTS, use_json
from cllm.cli._emit import emit_artifact, emit_plan
from cllm.cli._errors import handle_errors
from cllm.cli._options import DRY_RUN_OPTION, JSON_OPTION


class XAxis(str, Enum):
    size = "size"
    bpw = "bpw"


def report_cmd(
    files: list[str] = typer.Argument(
        ...,
        help="NDJSON from 'cllm eval --json' / 'cllm bench --json', sensitivity JSON reports; "
        "'-' reads stdin.",
        show_default=False,
    ),
    output: Path = typer.Option(
        Path("report"),
        "--output",
        "-o",
        help="Report folder; replaced only when cllm wrote it.",
    ),
    title: str = typer.Option(
        None, "--title", help="Heading of index.md and the plots [default: cllm report]."
    ),
    x: XAxis = typer.Option(
        XAxis.size, "--x", help="x axis of the plots and the table's marks: size on disk or bpw."
    ),
    force: bool = typer.Option(
        False, "--force", "-f", help="Redraw even if the folder was made from the same inputs."
    ),
    dry_run: bool = DRY_RUN_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Write a report folder from eval and bench results: one table, Pareto plots, heat maps.

    index.md holds one table of every model sorted by size (quality, task accuracy, speed),
    with the Pareto-optimal rows for size vs KLD marked, then the plots (pareto-size-kld.png,
    -ppl, -acc, pareto-speed-kld.png, pareto-energy-kld.png), the heat maps of sensitivity
    reports, and the measuring protocol. A plot whose data no input carries is skipped and
    index.md says so. Records of one setting with different seeds are one row (mean, min-max).
    Every input is checked before anything is written; the folder appears in one rename.

    Example:

        cllm eval m1.gguf m2.gguf --kld-base smollm2-135m --json > eval.ndjson

        cllm bench m1.gguf m2.gguf --json > bench.ndjson

        cllm report eval.ndjson bench.ndjson -o report/
    """
    _report(files, output, title, x.value, force, dry_run, as_json)


@handle_errors("report")
def _report(
    inputs: list[str],
    output: Path,
    title: str | None,
    x: str,
    force: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    from cllm.core.report import ReportRequest, build_report

    stdin = sys.stdin.read() if "-" in inputs else None
    req = ReportRequest(list(inputs), output, title, x, force, dry_run)
    result = build_report(req, stdin=stdin, events=EVENTS)
    if result.status == "planned":
        emit_plan(result.path, result.params, use_json(as_json))
    else:
        emit_artifact(result.path, "report", "report", result.params, None, use_json(as_json))
