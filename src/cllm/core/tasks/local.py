"""lm-eval task configs for the local copies of the task data (`$CLLM_DATA_DIR/tasks/`).

Each config uses lm-eval's own machinery (`dataset_path: json` with `data_files`, its
metrics and aggregation) with the prompt, choices and target of lm-eval's task of the same
name, rewritten for the field names of the local files (`{query, choices, gold}`, as in
MosaicML's local evaluation copies). With `--online`, lm-eval's own definitions are used
unchanged instead.

Differences from the online tasks, by the data rather than by cllm:
- hellaswag: the local file is lm-eval's preprocessing of HellaSwag validation, except
  that the second half of the context keeps its lower-case first letter;
- piqa: `query` already holds "Question: {goal}\\n", so the prompt appends "Answer:".
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cllm.errors import InputError, UsageError

MC = {"metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                      {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}  # fmt: skip


def _wino_text(doc: dict[str, Any]) -> int:
    return int(doc["gold"])  # lm-eval's winogrande: the gold *context* is the "text"


def _wino_target(doc: dict[str, Any]) -> str:
    return str(doc["continuation"]).strip()


def _wino_choices(doc: dict[str, Any]) -> list[str]:
    return list(doc["context_options"])


@dataclass(frozen=True)
class LocalTask:
    name: str
    file: str  # under $CLLM_DATA_DIR/tasks
    config: dict[str, Any]
    primary: str  # the metric a one-number summary uses


def _mc(text: str, metrics: dict[str, Any] = MC) -> dict[str, Any]:
    """A multiple-choice task over `{query, choices, gold}` rows."""
    return {"output_type": "multiple_choice", "doc_to_text": text,
            "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}", **metrics}  # fmt: skip


ACC = {"metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}

TASKS: dict[str, LocalTask] = {t.name: t for t in (
    LocalTask("arc_easy", "arc_easy.jsonl", _mc("{{query}}\nAnswer:"), "acc_norm"),
    LocalTask("arc_challenge", "arc_challenge.jsonl", _mc("{{query}}\nAnswer:"), "acc_norm"),
    LocalTask("hellaswag", "hellaswag_val.txt", _mc("{{query}}"), "acc_norm"),
    LocalTask("piqa", "piqa.jsonl", _mc("{{query}}Answer:"), "acc_norm"),
    LocalTask("winogrande", "winogrande.jsonl", {
        "output_type": "multiple_choice", "doc_to_text": _wino_text,
        "doc_to_target": _wino_target, "doc_to_choice": _wino_choices, **ACC}, "acc"),
    LocalTask("lambada_openai", "lambada_openai.jsonl", {
        "output_type": "loglikelihood", "doc_to_text": "{{context}}",
        "doc_to_target": "{{' ' + continuation}}",
        "metric_list": [{"metric": "perplexity", "aggregation": "perplexity",
                         "higher_is_better": False}, *ACC["metric_list"]]}, "acc"),
    LocalTask("openbookqa", "openbook_qa.jsonl", _mc("{{query}}"), "acc_norm"),
    LocalTask("copa", "copa.jsonl", _mc("{{query}}", ACC), "acc"),
)}  # fmt: skip


def tasks_dir() -> Path:
    from cllm.paths import data_dir

    return data_dir() / "tasks"


def task_names(spec: str) -> list[str]:
    """`a,b,c` into known task names, in order, without repeats."""
    names = list(dict.fromkeys(n.strip() for n in spec.split(",") if n.strip()))
    unknown = [n for n in names if n not in TASKS]
    if not names or unknown:
        raise UsageError(
            f"unknown task {', '.join(unknown) or '(none given)'}",
            "Available: " + ", ".join(TASKS) + " (or any lm-eval task with --online)",
        )
    return names


def _hellaswag_jsonl(src: Path) -> Path:
    """The six-lines-per-item text file as JSONL, written once into cllm's cache (keyed by
    the source's hash) so that lm-eval's `json` loader reads it like the others."""
    from cllm.paths import cache_dir

    digest = file_sha256(src)
    out = cache_dir() / "tasks" / f"hellaswag-{digest[:16]}.jsonl"
    if out.is_file():
        return out
    lines = src.read_text(encoding="utf-8").splitlines()
    if len(lines) % 6:
        raise InputError(f"{src} does not hold 6 lines per item", "Restore the original file")
    rows = [{"query": lines[i], "gold": int(lines[i + 1]), "choices": lines[i + 2 : i + 6]}
            for i in range(0, len(lines), 6)]  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(out)
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def task_config(name: str, num_fewshot: int | None) -> tuple[dict[str, Any], dict[str, str]]:
    """lm-eval's config dict for a local task, and {file: sha256} of the data it reads."""
    t = TASKS[name]
    src = tasks_dir() / t.file
    if not src.is_file():
        raise InputError(
            f"task data for {name} not found: looked for {src}",
            "Set CLLM_DATA_DIR to the folder that holds tasks/ (or use --online)",
        )
    data = _hellaswag_jsonl(src) if src.suffix == ".txt" else src
    cfg = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "metadata": {"version": 1.0, "source": "cllm local copy"},
        **t.config,
    }
    if num_fewshot is not None:
        cfg["num_fewshot"] = num_fewshot
    return cfg, {t.file: file_sha256(src)}


def metrics_of(name: str) -> set[str]:
    """The metrics a local task reports (for checking --fail-under before any work)."""
    return {m["metric"] for m in TASKS[name].config["metric_list"]}
