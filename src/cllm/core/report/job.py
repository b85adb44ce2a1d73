"""The report pipeline: request -> output check -> inputs read and checked -> id -> --dry-run
-> reuse when up to date -> drawn in a temporary folder beside the output -> renamed.

A report folder is cllm's when it holds the marker file `.cllm-report.json` (schema
`cllm.report/1`: the inputs' hashes, the options, the files written). Only such a folder,
holding nothing but the files its marker lists, is ever replaced; any other folder or file
at the output path is refused before an input is read. A report made from the same inputs
(by content) and options is up to date: nothing is redrawn unless `force`.
"""

from __future__ import annotations

import json
import os
import shutil
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

MARKER = ".cllm-report.json"
SCHEMA = "cllm.report/1"
INDEX = "index.md"
RENDERER = 1  # bump when the same inputs would give a different report
_HINT = "Choose another path with -o, or remove it"


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


# -- the output folder ---------------------------------------------------------------------


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a report folder cllm wrote, or None."""
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        return None
    if not isinstance(data.get("files"), list):
        return None
    return data


def check_output(path: Path, label: str) -> dict[str, Any] | None:
    """May a report be written at `path`? Returns the marker of the cllm report already
    there (None: nothing there); raises UsageError for anything else."""
    if path.is_symlink():
        raise UsageError(f"{label} is a symbolic link, not a cllm report folder", _HINT)
    if not path.exists():
        return None
    if not path.is_dir():
        raise UsageError(f"{label} is an existing file, not a cllm report folder", _HINT)
    marker = read_marker(path)
    if marker is None:
        raise UsageError(f"{label} is an existing folder that cllm did not write", _HINT)
    listed = {str(f) for f in marker["files"]} | {MARKER}
    extra = sorted(
        str(p.relative_to(path)) for p in path.rglob("*") if str(p.relative_to(path)) not in listed
    )
    if extra:
        shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        raise UsageError(
            f"{label} is a cllm report folder but also holds files cllm did not write ({shown})",
            "Move them out, or choose another path with -o",
        )
    return marker


def _fsync(path: Path) -> None:
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
    label = f"-o {req.output}"
    existing = check_output(dest, label)  # refused before any input is read
    require_matplotlib()
    inputs = load_inputs(req.inputs, stdin)
    params = _params(req, inputs)
    pid = provenance_id(None, "report", params)
    result = ReportResult("planned", Path(req.output), params)
    if req.dry_run:
        return result
    for left in remove_stale_temporaries(dest):
        events.warn(describe_leftover(left))
    if existing is not None and not req.force:
        same = (existing.get("provenance") or {}).get("id") == pid
        files = [str(f) for f in existing["files"]]
        if same and all((dest / f).is_file() for f in files):
            events.log(f"{req.output} is up to date (same inputs and options); --force redoes it")
            result.status, result.files = "reused", files
            return result
    for note in inputs.notes:
        events.warn(note)
    page = make_page(req, inputs)
    result.rows = len(page.groups)
    result.skipped = [f"{p.file}: {p.skipped}" for p in page.plots if p.skipped]
    result.files = write_folder(dest, label, page, params, events)
    result.status = "written"
    return result


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


def write_folder(
    dest: Path, label: str, page: Page, params: dict[str, Any], events: Events
) -> list[str]:
    """Draw everything into a temporary folder beside `dest`, then rename it onto `dest`."""
    from cllm.formats.atomic import fsync_file
    from cllm.formats.leftovers import make_temp_dir
    from cllm.formats.provenance import make_provenance

    tmp = make_temp_dir(dest)
    target = tmp / dest.name
    try:
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
        for f in [*files, MARKER]:
            fsync_file(target / f)
        check_output(dest, label)  # again at rename time: nothing else appeared meanwhile
        if dest.exists():
            os.replace(dest, tmp / (dest.name + ".old"))
        os.replace(target, dest)
        _fsync(dest.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    events.log(f"wrote {dest}: {', '.join(files)}")
    return files
