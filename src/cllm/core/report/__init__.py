"""`cllm report`: eval and bench records (and sensitivity maps) into one report folder.

    load.py      read every input, validate each record, merge and join them into candidates
    pareto.py    metrics per candidate, seed groups, Pareto frontiers and their step lines
    plots.py     the PNGs (matplotlib, imported only when drawing)
    markdown.py  index.md
    job.py       the pipeline: inputs -> id -> --dry-run -> reuse -> atomic folder write

Nothing here prints: the CLI passes an `Events` object for status lines and warnings.
"""

from __future__ import annotations

from cllm.core.report.job import MARKER, ReportRequest, ReportResult, build_report

__all__ = ["MARKER", "ReportRequest", "ReportResult", "build_report"]
