"""The report pipeline: request -> output check -> inputs read and checked -> id -> --dry-run
-> reuse when up to date -> drawn beside the output and renamed (`atomic_path`).

A report folder is a cllm output of kind `Kind.REPORT`: `formats.outputs` recognises it by
its marker file `.cllm-report.json` (schema `cllm.report/1`: the inputs' hashes, the
options, the files written) and refuses one that also holds files the marker does not list,
so only a folder cllm wrote, holding nothing else, is ever replaced; any other folder or
file at the output path is refused before an input is read. A report made from the same
inputs (by content) and options is up to date: nothing is redrawn unless `force`.

`core.job.run_job` does not drive this: it resolves one CHECKPOINT argument (`Job.accepts`
names checkpoint, ONNX and bundle inputs) and names the output after it, while a report
reads many record files (or stdin's text) and has no parent model. The steps are the same
and use the same pieces: `check_output`, leftovers cleanup, `provenance_id`, `atomic_path`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cllm.core.job import Events, Silent
from cllm.core.report.load import Inputs, load_inputs
from cllm.core.report.markdown import Page, render
from cllm.core.report.pareto import (
    bpw,
    common_tasks,
    group_seeds,
    kld,
    mean_acc,
    optimal_groups,
    ppl,
    size_mb,
    sort_by_size,
)
from cllm.core.report.plots import X_AXES, draw, draw_heatmap, plan_plots, require_matplotlib
from cllm.errors import UsageError
from cllm.formats.outputs import REPORT_MARKER as MARKER
from cllm.formats.outputs import REPORT_SCHEMA as SCHEMA
from cllm.formats.outputs import Kind, check_output

INDEX = "index.md"
RENDERER = 1  # bump when the same inputs would give a different report


@dataclass
class ReportRequest:
    inputs: list[str]
    output: Path = Path("report")
    title: str | None = None
    x: str = "size"  # size | bpw: the x axis of the plots and of the table's marks
    force: bool = False
    dry_run: bool = False

    def validate(self) -> None:
        if self.x not in X_AXES:
            raise UsageError(f"--x {self.x}: not one of {', '.join(X_AXES)}")
        if self.title is not None and (not self.title.strip() or "\n" in self.title):
            raise UsageError("--title must be one non-empty line")
        if not self.inputs:
            raise UsageError("no input files", "Give eval or bench NDJSON files, or '-'")


@dataclass
class ReportResult:
    status: str  # planned | reused | written
    path: Path
    params: dict[str, Any]
    files: list[str] = field(default_factory=list)
    rows: int = 0
    skipped: list[str] = field(default_factory=list)  # plots not drawn, with the reason


# -- the pipeline --------------------------------------------------------------------------


def _params(req: ReportRequest, inputs: Inputs) -> dict[str, Any]:
    return {
        "inputs": [{"name": f.name, "sha256": f.sha256} for f in inputs.files],
        "title": req.title,
        "x": req.x,
        "renderer": RENDERER,
    }


def build_report(
    req: ReportRequest, stdin: str | None = None, events: Events | None = None
) -> ReportResult:
    """Read every input, then write the report folder at `req.output` in one rename."""
    from cllm.formats.leftovers import describe_leftover, remove_stale_temporaries
    from cllm.formats.provenance import provenance_id

    events = events or Silent()
    req.validate()
    dest = Path(os.path.abspath(req.output))
    check = check_output(dest, Kind.REPORT, f"-o {req.output}")  # before any input is read
    require_matplotlib()
    inputs = load_inputs(req.inputs, stdin)
    params = _params(req, inputs)
    pid = provenance_id(None, "report", params)
    result = ReportResult("planned", Path(req.output), params)
    if req.dry_run:
        return result
    for left in remove_stale_temporaries(dest):
        events.warn(describe_leftover(left))
    if check.up_to_date(pid) and not req.force:
        events.log(f"{req.output} is up to date (same inputs and options); --force redoes it")
        result.status, result.files = "reused", _listed(dest)
        return result
    for note in inputs.notes:
        events.warn(note)
    page = make_page(req, inputs)
    result.rows = len(page.groups)
    result.skipped = [f"{p.file}: {p.skipped}" for p in page.plots if p.skipped]
    result.files = write_folder(dest, page, params, events)
    result.status = "written"
    return result


def _listed(folder: Path) -> list[str]:
    """The files the marker of a report folder lists."""
    marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    return [str(f) for f in marker["files"]]


def make_page(req: ReportRequest, inputs: Inputs) -> Page:
    groups = sort_by_size(group_seeds(inputs.candidates))
    tasks, all_tasks = common_tasks(inputs.candidates)
    x = bpw if req.x == "bpw" else size_mb
    xname = "bits per weight" if req.x == "bpw" else "size"
    marked: set[int] = set()
    marked_by = None
    for metric, what, higher in ((kld, "mean KLD", False), (ppl, "perplexity", False),
                                 (mean_acc(tasks), "mean task accuracy", True)):  # fmt: skip
        if any(g.get(metric) is not None and g.get(x) is not None for g in groups):
            marked = optimal_groups(groups, x, metric, y_higher=higher)
            marked_by = f"{xname} vs {what}"
            break
    plots = plan_plots(groups, req.x, tasks)
    maps = [(m, f"heatmap-{m.name}.png") for m in inputs.maps]
    return Page(req.title or "cllm report", inputs, groups, marked, marked_by, plots, maps,
                tasks, all_tasks, req.x)  # fmt: skip


def write_folder(dest: Path, page: Page, params: dict[str, Any], events: Events) -> list[str]:
    """Draw everything into a temporary folder beside `dest`, then rename it onto `dest`."""
    from cllm.formats.atomic import atomic_path
    from cllm.formats.provenance import make_provenance

    with atomic_path(dest, Kind.REPORT) as target:
        target.mkdir()
        files: list[str] = []
        drawn = [p for p in page.plots if p.skipped is None]
        with events.progress("drawing", len(drawn) + len(page.maps)) as advance:
            for p in drawn:
                draw(p, target / p.file, page.title if page.title != "cllm report" else None)
                files.append(p.file)
                advance()
            for m, file in page.maps:
                draw_heatmap(m, target / file)
                files.append(file)
                advance()
        (target / INDEX).write_text(render(page), encoding="utf-8")
        files = [INDEX, *files]
        marker = {
            "schema": SCHEMA,
            "files": files,
            "provenance": make_provenance("report", params, None, None),
        }
        (target / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")
    events.log(f"wrote {dest}: {', '.join(files)}")
    return files
