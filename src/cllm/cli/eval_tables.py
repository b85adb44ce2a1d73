"""`cllm eval`'s human output: tables built from its records (the same records --json prints)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cllm.cli._console import out_console


def print_records(records: list[dict[str, Any]]) -> None:
    """One table of all models when there are several; the detail of one; tasks; worst positions."""
    if len(records) > 1:
        _print_many(records)
    for rec in records:
        if len(records) == 1 and rec.get("perplexity") is not None:
            _print_table(rec)
        if rec.get("tasks") and (len(records) == 1 or rec.get("perplexity") is None):
            _print_tasks(rec)
        if rec.get("worst"):
            _print_worst(rec)


def _print_many(records: list[dict[str, Any]]) -> None:
    from rich.table import Table

    first = records[0]
    k0 = first.get("kld")
    title = f"base: {k0['base']} ({k0['base_backend']})" if k0 else None
    table = Table(title=title, title_justify="left")
    cols = ["model", "label", "backend", "MB", "bits/w", "perplexity", "mean KLD", "KLD p99",
            "top-1"]  # fmt: skip
    task_names = list(first.get("tasks") or {})
    cols += task_names
    for col in cols:
        left = col in ("model", "label", "backend")
        table.add_column(col, justify="left" if left else "right", overflow="fold")
    for r in records:
        k = r.get("kld")
        bpw = r.get("bits_per_weight")
        row = [
            Path(r["name"]).name, r["provenance"]["label"], r["backend"], f"{r['bytes'] / 1e6:.1f}",
            f"{bpw:.2f}" if bpw else "-",
            f"{r['perplexity']:.3f} ± {r['perplexity_se']:.3f}" if r.get("perplexity") else "-",
            f"{k['mean']:.5f}" if k else "-", f"{k['p99']:.4f}" if k else "-",
            f"{k['top1_agreement'] * 100:.1f}%" if k else "-",
        ]  # fmt: skip
        for name in task_names:
            t = (r.get("tasks") or {}).get(name, {})
            metric = "acc_norm" if "acc_norm" in t else "acc"
            row.append(f"{t[metric]:.3f}" if metric in t else "-")
        table.add_row(*row)
    out_console(min_width=140).print(table)


def _print_worst(rec: dict[str, Any]) -> None:
    from rich.table import Table

    def tops(items: list[dict[str, Any]]) -> str:
        return "\n".join(f"{t['token']!r} {t['p']:.2f}" for t in items)

    table = Table(title=f"{rec['name']}: the {len(rec['worst'])} positions of largest KLD",
                  title_justify="left", show_lines=True)  # fmt: skip
    for col in ("#", "KLD", "text before", "next", "base's top", "model's top"):
        table.add_column(col, justify="right" if col in ("#", "KLD") else "left")
    for w in rec["worst"]:
        table.add_row(str(w["rank"]), f"{w['kld']:.3f}", repr(w["context"])[1:-1],
                      repr(w["next"]), tops(w["base_top"]), tops(w["model_top"]))  # fmt: skip
    out_console(min_width=120).print(table)


def _print_tasks(result: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"{result['name']} ({result['backend']})", title_justify="left")
    for col in ("task", "metric", "value", "± stderr", "items", "shots"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for name, r in result["tasks"].items():
        for metric, value in r.items():
            if metric.endswith("_stderr") or metric in ("samples", "num_fewshot"):
                continue
            se = r.get(f"{metric}_stderr")
            table.add_row(name, metric, f"{value:.4f}", "" if se is None else f"{se:.4f}",
                          str(r.get("samples")), str(r.get("num_fewshot")))  # fmt: skip
    out_console().print(table)
    p = result["tasks_protocol"]
    out_console().print(f"lm-eval {p['lm_eval']}, {p['task_source']}, seed {p['seed']}")


def _print_table(r: dict[str, Any]) -> None:
    from rich.table import Table

    con = out_console()
    p = r["protocol"]
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("model", f"{r['model']} ({r['backend']})")
    table.add_row("perplexity", f"{r['perplexity']:.4f} ± {r['perplexity_se']:.4f}")
    k = r.get("kld")
    if k is not None:
        table.add_row(
            "base", f"{k['base']} ({k['base_backend']}), perplexity {r['base_perplexity']:.4f}"
        )
        table.add_row("mean KLD", f"{k['mean']:.6f} ± {k['mean_se']:.6f}")
        table.add_row(
            "KLD median / p99 / max", f"{k['median']:.6f} / {k['p99']:.6f} / {k['max']:.6f}"
        )
        table.add_row("top-1 agreement", f"{k['top1_agreement'] * 100:.2f}%")
    table.add_row(
        "protocol",
        f"{p['text']} (sha256 {p['text_sha256'][:12]}), ctx {p['ctx']}, {p['chunks']} chunks, "
        f"{p['tokens_scored']} tokens scored (second half of each chunk)",
    )
    con.print(table)
