"""Which Pareto plots a report has, and drawing them (matplotlib, imported only to draw).

Each plot puts one point per group (a model, or a setting over several seeds) with its
error bars, labels it with the provenance label, fills the Pareto-optimal points and draws
the frontier as a step line. A plot whose data no input carries is not drawn; `Plot.skipped`
says why, for index.md.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cllm.core.report.load import SensitivityMap, finite
from cllm.core.report.pareto import (
    Group,
    Metric,
    Value,
    bpw,
    frontier,
    kld,
    mean_acc,
    ppl,
    size_mb,
    staircase,
    tok_s,
    tokens_per_joule,
)
from cllm.errors import RuntimeFailure

X_AXES = ("size", "bpw")


@dataclass(frozen=True)
class Axis:
    metric: Metric
    label: str  # axis label
    what: str  # how a skip reason names the missing data
    higher: bool = False  # higher is better
    log: bool = False


@dataclass
class Plot:
    file: str
    title: str
    x: Axis
    y: Axis
    points: list[tuple[Group, Value, Value]] = field(default_factory=list)
    optimal: set[int] = field(default_factory=set)  # indices into points
    skipped: str | None = None
    note: str = ""  # under the title (e.g. the tasks a mean covers)


KLD = Axis(kld, "mean KLD vs base (log scale; lower is better)",
           "KLD (run `cllm eval` with `--kld-base BASE`)", log=True)  # fmt: skip
PPL = Axis(ppl, "perplexity (lower is better)", "perplexity")
SPEED = Axis(tok_s, "generation tok/s, median (higher is better)",
             "bench records (run `cllm bench ... --json` and pass its output)", higher=True)  # fmt: skip
ENERGY = Axis(tokens_per_joule, "tokens per joule (higher is better)",
              "energy figures in the bench records", higher=True)  # fmt: skip


def x_axis(name: str) -> Axis:
    if name == "bpw":
        return Axis(bpw, "bits per weight (lower is better)", "bits per weight")
    return Axis(size_mb, "size on disk, MB (lower is better)", "sizes")


def plan_plots(groups: Sequence[Group], x: str, tasks: Sequence[str]) -> list[Plot]:
    """Every plot the report can have, with its points, or the reason it is skipped."""
    ax = x_axis(x)
    shown = ", ".join(tasks)
    acc = Axis(mean_acc(tasks), "mean task accuracy (higher is better)",
               "task accuracy (run `cllm eval` with `--tasks ...`)", higher=True)  # fmt: skip
    plots = [
        Plot(f"pareto-{x}-kld.png", f"{x_name(x)} vs KLD", ax, KLD),
        Plot(f"pareto-{x}-ppl.png", f"{x_name(x)} vs perplexity", ax, PPL),
        Plot(
            f"pareto-{x}-acc.png", f"{x_name(x)} vs task accuracy", ax, acc, note=f"mean of {shown}"
        ),
        Plot("pareto-speed-kld.png", "Generation speed vs KLD", SPEED, KLD),
        Plot("pareto-energy-kld.png", "Energy vs KLD", ENERGY, KLD),
    ]
    for p in plots:
        _fill(p, groups)
    return plots


def x_name(x: str) -> str:
    return "Bits per weight" if x == "bpw" else "Size"


def _fill(plot: Plot, groups: Sequence[Group]) -> None:
    for g in groups:
        vx, vy = g.get(plot.x.metric), g.get(plot.y.metric)
        if vx is not None and vy is not None and finite(vx.value) and finite(vy.value):
            plot.points.append((g, vx, vy))
    if not plot.points:
        has_x = any(g.get(plot.x.metric) is not None for g in groups)
        has_y = any(g.get(plot.y.metric) is not None for g in groups)
        if not has_x:
            plot.skipped = f"no {plot.x.what}"
        elif not has_y:
            plot.skipped = f"no {plot.y.what}"
        else:
            plot.skipped = "no model has both"
        return
    pts = [(vx.value, vy.value) for _g, vx, vy in plot.points]
    plot.optimal = set(frontier(pts, plot.x.higher, plot.y.higher))


def require_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise RuntimeFailure(
            "matplotlib is not installed; cllm report draws its plots with it",
            "Install it: pip install 'cllm[plots]'",
        )


def point_labels(points: Sequence[tuple[Group, Value, Value]]) -> list[str]:
    """Provenance labels, made unique with the model's name where two points share one."""
    labels = [g.label for g, _x, _y in points]
    out = []
    for (g, _x, _y), label in zip(points, labels, strict=True):
        if labels.count(label) > 1:
            label = f"{label} [{g.first.name}]"
        if g.n > 1:
            label = f"{label} ({g.n} seeds)"
        out.append(label)
    return out


def draw(plot: Plot, path: Path, title: str | None = None) -> None:
    """One Pareto plot as a PNG (the Agg canvas directly: no pyplot, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(8, 5.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    floor = None
    if plot.y.log:
        positive = [vy.value for _g, _x, vy in plot.points if vy.value > 0]
        floor = min(positive) / 3 if positive else 1e-6

    def y_of(v: float) -> float:
        return max(v, floor) if floor is not None else v

    def bar(v: Value, fix: bool) -> list[list[float]] | None:
        if v.lo is None or v.hi is None:
            return None
        c = y_of(v.value) if fix else v.value
        lo = y_of(v.lo) if fix else v.lo
        return [[max(c - lo, 0.0)], [max(y_of(v.hi) - c if fix else v.hi - c, 0.0)]]

    labels = point_labels(plot.points)
    for i, ((_g, vx, vy), label) in enumerate(zip(plot.points, labels, strict=True)):
        best = i in plot.optimal
        ax.errorbar(
            [vx.value], [y_of(vy.value)], xerr=bar(vx, False), yerr=bar(vy, True), fmt="o",
            color="tab:red" if best else "tab:blue", mfc="tab:red" if best else "white",
            ms=6, capsize=2, elinewidth=0.8, zorder=3,
        )  # fmt: skip
        if floor is not None and vy.value <= 0:
            label += " (KLD 0)"
        ax.annotate(label, (vx.value, y_of(vy.value)), textcoords="offset points",
                    xytext=(5, 4), fontsize=7)  # fmt: skip
    best_pts = [(plot.points[i][1].value, y_of(plot.points[i][2].value)) for i in plot.optimal]
    line = staircase(best_pts, plot.x.higher, plot.y.higher)
    if len(line) > 1:
        ax.plot([p[0] for p in line], [p[1] for p in line], color="tab:red", lw=1.2, zorder=2)
    if plot.y.log:
        ax.set_yscale("log")
    ax.margins(x=0.15, y=0.08)  # room for the labels right of the points
    ax.set_xlabel(plot.x.label)
    ax.set_ylabel(plot.y.label)
    heading = f"{title}: {plot.title}" if title else plot.title
    ax.set_title(f"{heading}\n{plot.note}" if plot.note else heading, fontsize=11)
    ax.grid(True, which="both", alpha=0.25)
    handles = [
        Line2D([], [], color="tab:red", marker="o", lw=1.2, label="Pareto-optimal / frontier"),
        Line2D([], [], color="tab:blue", marker="o", mfc="white", lw=0, label="dominated"),
    ]
    ax.legend(handles=handles, fontsize=8, loc="best")
    # fixed margins: tight_layout would render the whole figure once more just to measure it
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.1, top=0.89 if plot.note else 0.93)
    fig.savefig(path, dpi=110, format="png", metadata={"Software": None})


def draw_heatmap(m: SensitivityMap, path: Path) -> None:
    """The same heat map `--sensitivity` writes beside its JSON."""
    from cllm.core.heatmap import heatmap

    heatmap(m.kld, m.columns, m.xlabel, m.title, path)
