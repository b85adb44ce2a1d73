"""Task accuracy through lm-eval, in process, on any backend: `run_tasks`."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from cllm.errors import UsageError


@dataclass
class TaskConfig:
    tasks: list[str]
    backend: str = "torch"
    limit: int | None = None  # items per task (the first N, as lm-eval's --limit)
    num_fewshot: int | None = None  # None: each task's default (0 for the local ones)
    seed: int = 0
    batch_size: int = 64  # requests per backend call (torch pads batches of 8 within it)
    max_length: int = 2048
    threads: int | None = None
    online: bool = False  # lm-eval's own task definitions and the hub's data sets


@dataclass
class TaskResult:
    model: str
    backend: str
    tasks: dict[str, dict[str, Any]]  # name -> {metric: value, metric_stderr: se, samples: n}
    protocol: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quiet_lm_eval() -> None:
    """lm-eval logs its progress and advice at INFO/WARNING and draws tqdm bars; cllm's
    stderr carries cllm's own progress instead. Its environment probe is skipped: it runs
    torch's `collect_env` (a dozen subprocesses, seconds) and `git describe` (which prints
    "fatal: not a git repository" outside one); cllm records versions in its own output."""
    import datasets
    import lm_eval.evaluator as ev

    for name in ("lm-eval", "lm_eval", "lm_eval.evaluator", "datasets", "evaluate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    ev.add_env_info = lambda storage: None
    ev.get_git_commit_hash = lambda: None


@contextlib.contextmanager
def _no_tqdm() -> Iterator[None]:
    """lm-eval's tqdm bars off while it runs (TQDM_DISABLE is read when tqdm is imported,
    which transformers has done long before)."""
    import functools

    import tqdm

    init = tqdm.tqdm.__init__
    tqdm.tqdm.__init__ = functools.partialmethod(init, disable=True)  # type: ignore[assignment,method-assign]
    try:
        yield
    finally:
        tqdm.tqdm.__init__ = init  # type: ignore[method-assign]


def _specs(cfg: TaskConfig) -> tuple[list[Any], dict[str, str]]:
    if cfg.online:
        return list(cfg.tasks), {}
    from cllm.core.tasks.local import task_config

    specs, hashes = [], {}
    for name in cfg.tasks:
        spec, files = task_config(name, cfg.num_fewshot)
        specs.append(spec)
        hashes.update(files)
    return specs, hashes


def _metrics(raw: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if "," not in key or key.startswith("alias"):
            continue
        metric, _filter = key.split(",", 1)
        if isinstance(value, (int, float)):
            out[metric] = float(value)
    return out


def run_tasks(
    model: Any,
    cfg: TaskConfig,
    on_progress: Callable[[int], None] | None = None,
) -> TaskResult:
    """Evaluate `model` (a checkpoint or an ONNX export) on the tasks of `cfg`."""
    if not cfg.online:
        from cllm.paths import cache_dir

        os.environ.setdefault("HF_DATASETS_CACHE", str(cache_dir() / "datasets"))
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise UsageError("--tasks needs lm-eval", "pip install 'cllm[tasks]'") from exc
    from transformers import AutoTokenizer

    from cllm.core.tasks.lm import CllmLM
    from cllm.core.tasks.sessions import open_scorer

    _quiet_lm_eval()
    specs, hashes = _specs(cfg)
    tokenizer = AutoTokenizer.from_pretrained(str(model.tokenizer_dir()))
    scorer = open_scorer(model, cfg.backend, cfg.max_length, cfg.threads, 8)
    try:
        lm = CllmLM(scorer, tokenizer, cfg.max_length, cfg.batch_size, on_progress=on_progress)
        # lm-eval prints some notes with print(): stdout carries only cllm's records
        with contextlib.redirect_stdout(sys.stderr), _no_tqdm():
            out = lm_eval.simple_evaluate(
                model=lm, tasks=specs, num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                task_manager=TaskManager(include_defaults=cfg.online), random_seed=cfg.seed,
                numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
                fewshot_random_seed=cfg.seed, bootstrap_iters=1000, log_samples=False,
            )  # fmt: skip
    finally:
        scorer.close()
    results = {}
    for name in cfg.tasks:
        r = _metrics(out["results"].get(name, {}))
        r["samples"] = int((out.get("n-samples") or {}).get(name, {}).get("effective", 0))
        r["num_fewshot"] = (out.get("n-shot") or {}).get(name)
        results[name] = r
    protocol = {
        "lm_eval": getattr(lm_eval, "__version__", "?"),
        "task_source": "lm-eval (online)" if cfg.online else "cllm local configs",
        "task_files_sha256": hashes,
        "limit": cfg.limit,
        "num_fewshot": cfg.num_fewshot,
        "seed": cfg.seed,
        "max_length": cfg.max_length,
    }
    return TaskResult(str(model.path), cfg.backend, results, protocol)


# metrics where lower is better; every other task metric is a score (higher is better)
_LOWER_IS_BETTER = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")


def parse_bars(spec: str) -> list[tuple[str | None, str, float]]:
    """`acc=0.4,arc_easy.acc_norm=0.35` into (task or None, metric, value)."""
    bars = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        name, sep, value = part.partition("=")
        try:
            bar = float(value)
        except ValueError:
            bar = float("nan")
        if not sep or not name or bar != bar:
            raise UsageError(
                f"--fail-under {part} is not METRIC=X",
                "With --tasks, give e.g. acc=0.40 or arc_easy.acc_norm=0.35",
            )
        task, _, metric = name.rpartition(".")
        bars.append((task or None, metric, bar))
    return bars


def precheck_bars(tasks: list[str], bars: list[tuple[str | None, str, float]]) -> None:
    """Bars on local tasks that cannot be met (an unknown task or metric): refused before
    any work. (lm-eval's online tasks are checked once their results are in.)"""
    from cllm.core.tasks.local import metrics_of

    for task, metric, _bar in bars:
        if task is not None and task not in tasks:
            raise UsageError(
                f"--fail-under names task {task}, which is not in --tasks",
                "Evaluated: " + ", ".join(tasks),
            )
        names = [task] if task else tasks
        if not any(metric in metrics_of(n) for n in names):
            have = sorted(set().union(*(metrics_of(n) for n in names)))
            raise UsageError(
                f"--fail-under names {metric}, which "
                + (f"task {task} does not report" if task else "none of these tasks reports"),
                "Metrics here: " + ", ".join(have),
            )


def check_bars(result: TaskResult, bars: list[tuple[str | None, str, float]]) -> list[str]:
    """The bars a result misses, as sentences; a bar naming a metric (or task) that was not
    computed is a usage error, not a pass."""
    failed = []
    for task, metric, bar in bars:
        names = [task] if task else list(result.tasks)
        hits = [(n, result.tasks[n][metric]) for n in names
                if n in result.tasks and metric in result.tasks[n]]  # fmt: skip
        if not hits:
            where = f"task {task}" if task else "any task evaluated"
            raise UsageError(
                f"--fail-under names {metric}, which was not computed for {where}",
                "Metrics here: " + ", ".join(sorted({m for r in result.tasks.values() for m in r
                                                     if not m.endswith("_stderr")
                                                     and m not in ("samples", "num_fewshot")})),
            )  # fmt: skip
        for n, value in hits:
            worse = value > bar if metric in _LOWER_IS_BETTER else value < bar
            if worse:
                side = "above" if metric in _LOWER_IS_BETTER else "below"
                failed.append(f"{n} {metric} {value:.4f} is {side} --fail-under {bar}")
    return failed


def plan_tasks(
    names: str, bars_spec: str | None, cfg: TaskConfig
) -> tuple[TaskConfig, list[tuple[str | None, str, float]]]:
    """Task names and --fail-under bars checked before any work: the config with its task
    list, and the parsed bars (METRIC=X or TASK.METRIC=X)."""
    from dataclasses import replace

    if cfg.online:
        chosen = [n.strip() for n in names.split(",") if n.strip()]
    else:
        from cllm.core.tasks.local import task_names

        chosen = task_names(names)
    bars = parse_bars(bars_spec) if bars_spec else []
    if not cfg.online:
        precheck_bars(chosen, bars)
    return replace(cfg, tasks=chosen), bars
