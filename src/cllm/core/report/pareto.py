"""Numbers per candidate, seed groups, and Pareto frontiers.

A metric reads one number from a candidate, with its error bar when the record carries one
(± standard error for perplexity, KLD and task accuracy; min-max of the timed runs for
speed and energy). Candidates made with the same `provenance.setting` (every parameter of
every step except seeds) on the same backend and evaluation protocol form one group: its
value is the mean over the group and its error bar the min-max range across seeds.

A point is Pareto-optimal when no other point is at least as good on both axes and strictly
better on one; points with equal coordinates do not dominate each other. On the x axis
(size, speed) values within 0.1% of each other count as equal: files of one bit width from
different methods differ only by the length of their provenance text, a few hundred bytes,
and that must not make a far worse model "optimal" by being smaller.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cllm.core.report.load import Candidate, finite

# lm-eval's headline metric: length-normalised accuracy where the task reports it
NORM_TASKS = frozenset({"hellaswag", "arc_easy", "arc_challenge", "piqa", "openbookqa"})


@dataclass(frozen=True)
class Value:
    """A number and its error bar [lo, hi] (absolute ends; None: no bar)."""

    value: float
    lo: float | None = None
    hi: float | None = None
    spread: bool = False  # True: lo/hi are the min-max over seeds
    n: int = 1

    @classmethod
    def with_se(cls, value: float, se: float | None) -> Value:
        if se is None or not math.isfinite(se):
            return cls(value)
        return cls(value, value - se, value + se)

    @property
    def se(self) -> float | None:
        if self.spread or self.lo is None or self.hi is None:
            return None
        return (self.hi - self.lo) / 2


Metric = Callable[[Candidate], "Value | None"]


def size_mb(c: Candidate) -> Value:
    return Value(c.bytes / 1e6)


def bpw(c: Candidate) -> Value | None:
    return None if c.bits_per_weight is None else Value(c.bits_per_weight)


def ppl(c: Candidate) -> Value | None:
    return None if c.perplexity is None else Value.with_se(c.perplexity, c.perplexity_se)


def kld(c: Candidate) -> Value | None:
    if not c.kld:
        return None
    return Value.with_se(float(c.kld["mean"]), c.kld.get("mean_se"))


def _kld_field(key: str) -> Metric:
    def get(c: Candidate) -> Value | None:
        v = (c.kld or {}).get(key)
        return None if v is None else Value(float(v))

    return get


kld_p99 = _kld_field("p99")
top1 = _kld_field("top1_agreement")


def headline(task: str, metrics: dict[str, Any]) -> tuple[str, float, float | None] | None:
    """(metric name, value, stderr): acc_norm for the tasks lm-eval reports it as their
    headline (hellaswag, arc_*, piqa, openbookqa) when present, acc otherwise."""
    order = ("acc_norm", "acc") if task in NORM_TASKS else ("acc", "acc_norm")
    for name in order:
        v = metrics.get(name)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            se = metrics.get(f"{name}_stderr")
            return name, float(v), float(se) if isinstance(se, (int, float)) else None
    return None


def task_acc(task: str) -> Metric:
    def get(c: Candidate) -> Value | None:
        h = headline(task, c.tasks.get(task) or {})
        return None if h is None else Value.with_se(h[1], h[2])

    return get


def mean_acc(tasks: Sequence[str]) -> Metric:
    """Mean headline accuracy over `tasks` (None unless the candidate has all of them);
    its standard error treats the tasks as independent: sqrt(sum se^2) / k."""

    def get(c: Candidate) -> Value | None:
        if not tasks:
            return None
        hs = [headline(t, c.tasks.get(t) or {}) for t in tasks]
        if any(h is None for h in hs):
            return None
        vals = [h[1] for h in hs if h is not None]
        ses = [h[2] for h in hs if h is not None]
        mean = sum(vals) / len(vals)
        if any(s is None for s in ses):
            return Value(mean)
        return Value.with_se(mean, math.sqrt(sum(s * s for s in ses if s is not None)) / len(ses))

    return get


def _summary(d: Any) -> Value | None:
    if not isinstance(d, dict) or d.get("median") is None:
        return None
    return Value(float(d["median"]), d.get("min"), d.get("max"))


def tok_s(c: Candidate) -> Value | None:
    b = c.speed
    return None if b is None else _summary(b.get("tg_tps"))


def j_per_token(c: Candidate) -> Value | None:
    b = c.speed
    energy = (b or {}).get("energy")
    return _summary(energy.get("joules_per_token")) if isinstance(energy, dict) else None


def tokens_per_joule(c: Candidate) -> Value | None:
    j = j_per_token(c)
    if j is None or not j.value > 0:
        return None
    lo = 1 / j.hi if j.hi else None
    hi = 1 / j.lo if j.lo else None
    return Value(1 / j.value, lo, hi)


def common_tasks(candidates: Sequence[Candidate]) -> tuple[list[str], list[str]]:
    """(tasks every candidate with task results has, all tasks seen), in first-seen order:
    the mean accuracy is taken over the first list so that every mean covers the same tasks."""
    seen: list[str] = []
    with_tasks = [c for c in candidates if c.tasks]
    for c in with_tasks:
        for t in c.tasks:
            if t not in seen and headline(t, c.tasks[t]) is not None:
                seen.append(t)
    common = [t for t in seen if all(headline(t, c.tasks.get(t) or {}) for c in with_tasks)]
    return common, seen


# -- seed groups ---------------------------------------------------------------------------


@dataclass
class Group:
    """One table row and one plot point: a model, or one setting run with several seeds."""

    members: list[Candidate]

    @property
    def first(self) -> Candidate:
        return self.members[0]

    @property
    def label(self) -> str:
        return self.first.label

    @property
    def n(self) -> int:
        return len(self.members)

    @property
    def seeds(self) -> list[Any]:
        return [m.provenance.get("seed") for m in self.members]

    def get(self, metric: Metric) -> Value | None:
        """The member's value, or the mean over members with the min-max range as the bar."""
        vals = [v for v in (metric(m) for m in self.members) if v is not None]
        if self.n == 1 or len(vals) <= 1:
            return vals[0] if vals else None
        xs = [v.value for v in vals if math.isfinite(v.value)]
        if not xs:
            return vals[0]
        return Value(sum(xs) / len(xs), min(xs), max(xs), spread=True, n=len(xs))

    @property
    def bytes(self) -> float:
        return sum(m.bytes for m in self.members) / self.n


def _group_key(c: Candidate, i: int) -> tuple[Any, ...]:
    setting = c.provenance.get("setting")
    if not (c.evaluated and c.has_steps and isinstance(setting, str)):
        return ("model", i)
    p = c.protocol
    return (
        "setting", setting, c.backend, c.format, (c.kld or {}).get("base_sha256"),
        p.get("text_sha256"), p.get("ctx"), p.get("chunks"),
    )  # fmt: skip


def group_seeds(candidates: Sequence[Candidate]) -> list[Group]:
    """Candidates of one setting (same steps and parameters except seeds, same backend,
    format, KLD base and eval protocol) as one group; everything else alone. First-seen order."""
    groups: dict[tuple[Any, ...], Group] = {}
    for i, c in enumerate(candidates):
        key = _group_key(c, i)
        if key in groups:
            groups[key].members.append(c)
        else:
            groups[key] = Group([c])
    return list(groups.values())


def sort_by_size(groups: Sequence[Group]) -> list[Group]:
    return sorted(groups, key=lambda g: (g.bytes, g.label, g.first.name))


# -- Pareto frontier -----------------------------------------------------------------------


def frontier(
    points: Sequence[tuple[float, float] | None], x_higher: bool = False, y_higher: bool = False
) -> list[int]:
    """Indices of the Pareto-optimal points, by increasing x. Lower is better on an axis
    unless its `*_higher` says otherwise; missing or non-finite points are never optimal."""
    sx, sy = (-1 if x_higher else 1), (-1 if y_higher else 1)
    pts = [
        (i, sx * p[0], sy * p[1])
        for i, p in enumerate(points)
        if p is not None and finite(p[0]) and finite(p[1])
    ]
    out = []
    for i, x, y in pts:
        dominated = any(
            _at_most(x2, x) and y2 <= y and (_below(x2, x) or y2 < y) for j, x2, y2 in pts if j != i
        )
        if not dominated:
            out.append(i)
    return sorted(out, key=lambda i: (points[i][0], points[i][1]))  # type: ignore[index]


X_RTOL = 1e-3  # x values this close (relative) are equal for dominance


def _at_most(a: float, b: float) -> bool:
    return a <= b + X_RTOL * max(abs(a), abs(b))


def _below(a: float, b: float) -> bool:
    return a < b - X_RTOL * max(abs(a), abs(b))


def staircase(
    points: Sequence[tuple[float, float]], x_higher: bool = False, y_higher: bool = False
) -> list[tuple[float, float]]:
    """The step line through frontier points: between neighbours it turns at the corner on
    the dominated side (the worse x and the worse y of the two), so the region it bounds is
    what the frontier dominates."""
    pts = sorted(points)
    if not pts:
        return []
    line = [pts[0]]
    for a, b in zip(pts, pts[1:], strict=False):
        x = min(a[0], b[0]) if x_higher else max(a[0], b[0])
        y = min(a[1], b[1]) if y_higher else max(a[1], b[1])
        line += [(x, y), b]
    return line


def optimal_groups(
    groups: Sequence[Group], x: Metric, y: Metric, x_higher: bool = False, y_higher: bool = False
) -> set[int]:
    """Indices into `groups` on the frontier of x against y (group means)."""
    pts: list[tuple[float, float] | None] = []
    for g in groups:
        vx, vy = g.get(x), g.get(y)
        pts.append(None if vx is None or vy is None else (vx.value, vy.value))
    return set(frontier(pts, x_higher, y_higher))
