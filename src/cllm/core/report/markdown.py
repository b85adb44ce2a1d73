"""index.md: the table of every model, the plots, the heat maps, and how it was measured."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cllm.core.report.load import Candidate, Inputs, SensitivityMap
from cllm.core.report.pareto import (
    Group,
    Metric,
    Value,
    bpw,
    headline,
    j_per_token,
    kld,
    kld_p99,
    mean_acc,
    ppl,
    size_mb,
    task_acc,
    tok_s,
    top1,
)
from cllm.core.report.plots import Plot

STAR = "★"
DASH = "—"


@dataclass
class Page:
    """Everything index.md shows, decided by the job."""

    title: str
    inputs: Inputs
    groups: list[Group]  # sorted by size
    marked: set[int]  # indices into groups
    marked_by: str | None  # "size vs mean KLD", ... (None: no row could be marked)
    plots: list[Plot]
    maps: list[tuple[SensitivityMap, str]]  # map, its PNG's file name
    tasks: list[str]  # the tasks the mean accuracy covers
    all_tasks: list[str]
    x: str


def _esc(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _num(fmt: str, scale: float = 1.0) -> Callable[[float], str]:
    def f(v: float) -> str:
        return format(v * scale, fmt)

    return f


def cell(
    v: Value | None, fmt: Callable[[float], str], err: Callable[[float], str] | None = None
) -> str:
    """`x ± se` for one model, `mean (min–max)` for a seed group, `x` without a bar."""
    if v is None:
        return DASH
    text = fmt(v.value)
    if v.spread and v.lo is not None and v.hi is not None:
        lo, hi = fmt(v.lo), fmt(v.hi)
        return text if lo == hi == text else f"{text} ({lo}–{hi})"
    se = v.se
    if err is not None and se is not None:
        return f"{text} ± {err(se)}"
    return text


@dataclass(frozen=True)
class Column:
    header: str
    metric: Metric
    fmt: Callable[[float], str]
    err: Callable[[float], str] | None = None


def columns(page: Page) -> list[Column]:
    groups = page.groups

    def some(metric: Metric) -> bool:
        return any(g.get(metric) is not None for g in groups)

    cols = [Column("MB", size_mb, _num(".1f")), Column("bits/weight", bpw, _num(".2f"))]
    if some(ppl):
        cols.append(Column("ppl ± se", ppl, _num(".2f"), _num(".2f")))
    if some(kld):
        cols += [
            Column("mean KLD ± se", kld, _num(".3g"), _num(".2g")),
            Column("KLD p99", kld_p99, _num(".3g")),
            Column("top-1 %", top1, _num(".1f", 100)),
        ]
    for task in page.all_tasks:
        metric = _metric_name(task, [m for g in groups for m in g.members])
        cols.append(
            Column(f"{task} {metric} %", task_acc(task), _num(".1f", 100), _num(".1f", 100))
        )
    if len(page.tasks) > 1:
        cols.append(Column("mean acc %", mean_acc(page.tasks), _num(".1f", 100), _num(".1f", 100)))
    if some(tok_s):
        cols.append(Column("tok/s", tok_s, _num(".1f")))
    if some(j_per_token):
        cols.append(Column("J/token", j_per_token, _num(".3g")))
    return cols


def _metric_name(task: str, members: Sequence[Candidate]) -> str:
    names = {h[0] for c in members if (h := headline(task, c.tasks.get(task) or {}))}
    return "/".join(sorted(names)) or "acc"


def table(page: Page) -> list[str]:
    cols = columns(page)
    seeds = any(g.n > 1 for g in page.groups)
    head = [STAR, "label", "name", "format", "backend", *(c.header for c in cols)]
    if seeds:
        head.append("seeds")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for i, g in enumerate(page.groups):
        name = g.first.name if g.n == 1 else f"{g.first.name} (+{g.n - 1} more)"
        label = g.label if g.first.evaluated else f"{DASH} (bench only)"
        row = [STAR if i in page.marked else "", label, name, g.first.format or DASH,
               g.first.backend or DASH]  # fmt: skip
        row += [cell(g.get(c.metric), c.fmt, c.err) for c in cols]
        if seeds:
            row.append(str(g.n))
        lines.append("| " + " | ".join(_esc(x) for x in row) + " |")
    return lines


def how_to_read(page: Page) -> str:
    bases = _bases(page.inputs.candidates)
    base = " and ".join(f"`{b}`" for b in bases) if bases else "the model `kld.base` names"
    text = (
        "Each row is one model file on one eval backend, sorted by size on disk. "
        "A single model shows ± one standard error (perplexity, KLD, task accuracy); a row "
        "with several seeds is one setting (the same steps and parameters except the seed) "
        "and shows the mean over its seeds with the min–max range across seeds in "
        "parentheses. "
    )
    if page.marked_by:
        text += (
            f"{STAR} marks the Pareto-optimal rows for {page.marked_by}: no other row is at "
            "least as good on both and better on one (sizes within 0.1% count as equal). "
        )
    text += (
        f"KLD is the mean KL divergence of each model's next-token distribution from the "
        f"base model's over the scored positions; the base is what `kld.base` names in the "
        f"eval records: {base}. top-1 % is the share of positions where both pick the same "
        "token. Lower is better for size, perplexity and KLD; higher for accuracy, top-1 "
        "agreement and tok/s. "
    )
    if page.all_tasks:
        text += (
            "Task accuracy is lm-eval's headline metric per task: acc_norm for hellaswag, "
            "arc_easy, arc_challenge, piqa and openbookqa when present, acc otherwise"
        )
        if len(page.tasks) > 1:
            text += f"; mean acc averages {', '.join(page.tasks)}"
        text += ". "
    if any(g.get(tok_s) for g in page.groups):
        text += "tok/s is the median generation speed from `cllm bench`. "
    return text.strip()


def _bases(cands: Sequence[Candidate]) -> list[str]:
    out: list[str] = []
    for c in cands:
        b = (c.kld or {}).get("base")
        if b and b not in out:
            out.append(str(b))
    return out


def _n(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _sha(s: Any) -> str:
    return f"`{str(s)[:12]}…`" if s else DASH


def protocol(page: Page) -> list[str]:
    cands = page.inputs.candidates
    lines: list[str] = []
    protos: dict[tuple[Any, ...], list[str]] = {}
    for c in cands:
        p = c.protocol
        if c.perplexity is None and not c.kld:
            continue
        key = (p.get("text"), p.get("text_sha256"), p.get("ctx"), p.get("chunks"),
               p.get("tokens_scored"))  # fmt: skip
        protos.setdefault(key, []).append(c.name)
    for (text, sha, ctx, chunks, tokens), names in protos.items():
        where = f" ({', '.join(names)})" if len(protos) > 1 else ""
        shown = Path(str(text)).name if text else "?"
        lines.append(
            f"- Perplexity and KLD{where}: text `{shown}` (sha256 {_sha(sha)}), ctx {ctx}, "
            f"{chunks} chunks, {tokens} tokens scored (the second half of each chunk)."
        )
    if len(protos) > 1:
        lines.append(
            f"- **Warning:** the eval records use {len(protos)} different protocols; "
            "their perplexity and KLD are not comparable across them."
        )
    bases: dict[tuple[Any, ...], None] = {}
    for c in cands:
        if c.kld:
            bases[(c.kld.get("base"), c.kld.get("base_sha256"), c.kld.get("base_backend"))] = None
    for b, bsha, bback in bases:
        lines.append(
            f"- KLD base: `{b}` (sha256 {_sha(bsha)}, {bback or '?'} backend): every mean KLD "
            "is measured against this model, the one `kld.base` names in the eval records."
        )
    if len(bases) > 1:
        lines.append(
            "- **Warning:** the rows have different KLD bases; their KLD is not comparable."
        )
    tp = next((c.task_protocol for c in cands if c.task_protocol), {})
    version = tp.get("lm_eval")
    if page.all_tasks:
        parts = [f"lm-eval {version}" if version else "lm-eval"]
        if tp.get("task_source"):
            parts.append(str(tp["task_source"]))
        per = []
        for task in page.all_tasks:
            m = next((c.tasks[task] for c in cands if task in c.tasks), {})
            bits = []
            if m.get("samples") is not None:
                bits.append(f"{m['samples']} samples")
            if m.get("num_fewshot") is not None:
                bits.append(f"{m['num_fewshot']}-shot")
            per.append(f"{task}" + (f" ({', '.join(bits)})" if bits else ""))
        lines.append(f"- Tasks: {', '.join(parts)}; {'; '.join(per)}.")
    bench = [c.speed for c in cands if c.speed is not None]
    if bench:
        b = bench[0]
        dev = b.get("device") or {}
        threads = f", {b['threads']} threads" if b.get("threads") else ""
        on = f", on {dev['cpu']}" if isinstance(dev, dict) and dev.get("cpu") else ""
        lines.append(
            f"- Speed: `cllm bench`, prompt {b.get('prompt', '?')} tokens, generate "
            f"{b.get('gen', '?')}, median of {b.get('repeat', '?')} runs{threads}{on}."
        )
        sources = sorted({str(x["energy"].get("source")) for x in bench
                          if isinstance(x.get("energy"), dict)})  # fmt: skip
        if sources:
            lines.append(f"- Energy: measured by {', '.join(sources)}.")
    return lines or ["- No eval or bench records."]


def render(page: Page) -> str:
    inp = page.inputs
    out = [f"# {page.title}", ""]
    names = ", ".join(f"`{f.name}`" for f in inp.files)
    out.append(
        f"{_n(len(page.groups), 'row')} from {_n(inp.n_eval, 'eval record')}, "
        f"{_n(inp.n_bench, 'bench record')} and {_n(len(page.maps), 'sensitivity map')}, "
        f"read from {names}."
    )
    out += ["", "## Models", ""]
    if page.groups:
        out += table(page)
        out += ["", how_to_read(page)]
        if not page.marked_by:
            out += ["", "No row is marked: no record has KLD, perplexity or task accuracy."]
        seeded = [g for g in page.groups if g.n > 1]
        if seeded:
            out += ["", "Seed groups:", ""]
            for g in seeded:
                members = ", ".join(
                    f"{m.name} (seed {m.provenance.get('seed', '?')})" for m in g.members
                )
                out.append(f"- {_esc(g.label)}: {members}")
    else:
        out.append("No eval or bench records: only sensitivity maps.")
    drawn = [p for p in page.plots if p.skipped is None]
    skipped = [p for p in page.plots if p.skipped is not None]
    out += ["", "## Plots", ""]
    if drawn:
        out.append(
            "One point per row; filled points are Pareto-optimal and the step line is the "
            "frontier. Error bars: ± one standard error, or the min–max range over seeds for a "
            "row with several seeds (speed: min–max of the timed runs)."
        )
    for p in drawn:
        out += ["", f"### {p.title}", "", f"![{p.title}]({p.file})"]
    if skipped:
        out += ["", "Not drawn:", ""]
        for p in skipped:
            out.append(f"- {p.title} (`{p.file}`): {p.skipped}.")
    if page.maps:
        out += ["", "## Sensitivity heat maps", ""]
        out.append(
            "Log10 of the KLD when only one part of one layer is changed (quantized to a type, "
            "or pruned); darker cells are more sensitive."
        )
        for m, file in page.maps:
            out += ["", f"### {_esc(m.name)}", "", f"From `{m.source}`.", "",
                    f"![{_esc(m.title)}]({file})"]  # fmt: skip
    out += ["", "## Protocol", "", *protocol(page)]
    if inp.notes:
        out += ["", "## Notes", "", *(f"- {_esc(n)}" for n in inp.notes)]
    if page.x == "bpw":
        out += ["", "Plots and marks put bits per weight on the x axis (`--x bpw`)."]
    return "\n".join(out) + "\n"
