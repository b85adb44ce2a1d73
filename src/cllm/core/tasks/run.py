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
