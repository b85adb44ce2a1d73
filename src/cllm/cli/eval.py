"""`cllm eval`: perplexity and KL divergence under the pinned protocol."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any

import typer

from cllm.cli._console import log, progress, use_json
from cllm.cli._emit import emit_json
from cllm.cli._errors import handle_errors
from cllm.cli._options import JSON_OPTION
from cllm.errors import CheckFailed, UsageError


class BackendName(str, Enum):
    torch = "torch"
    llamacpp = "llama.cpp"
    onnxruntime = "onnxruntime"
    auto = "auto"


def eval_cmd(
    checkpoints: list[str] = typer.Argument(
        ...,
        help="Models (paths, aliases, ONNX exports); '-' reads one from stdin. With several "
        "and no --kld-base, the first is the base of the others.",
    ),
    backend: BackendName = typer.Option(
        BackendName.torch,
        "--backend",
        "-b",
        help="torch (dequantized weights), llama.cpp (the GGUF's own kernels), onnxruntime "
        "(ONNX exports; picked for them) or auto (GGUF: llama.cpp, else torch).",
    ),
    text: Path = typer.Option(
        None, "--text", help="Evaluation text [default: $CLLM_DATA_DIR/wikitext-2/wiki.test.raw]."
    ),
    ctx: int = typer.Option(
        512, "--ctx", help="Tokens per chunk; the second half of each chunk is scored."
    ),
    chunks: int = typer.Option(
        None, "--chunks", "-n", help="Score only the first N chunks [default: all]."
    ),
    kld_base: str = typer.Option(
        None, "--kld-base", help="Base checkpoint for KL divergence and top-1 agreement."
    ),
    base_backend: BackendName = typer.Option(
        BackendName.torch, "--base-backend", help="Backend that computes the base's logits."
    ),
    show_worst: int = typer.Option(
        0,
        "--show-worst",
        help="Print the N scored positions of largest KLD: the text, the next token, and "
        "both models' top tokens.",
    ),
    threads: int = typer.Option(None, "--threads", "-t", help="CPU threads [default: all cores]."),
    fail_under: str = typer.Option(
        None,
        "--fail-under",
        help="Exit 3 below the bar: perplexity above X; with --tasks, METRIC=X or "
        "TASK.METRIC=X (comma-separated), e.g. acc=0.40 or arc_easy.acc_norm=0.35.",
    ),
    max_kld: float = typer.Option(None, "--max-kld", help="Exit 3 if mean KLD is above this."),
    no_cache: bool = typer.Option(
        False, "--no-cache", help="Do not read or write the base logits cache."
    ),
    allow_nonfinite: bool = typer.Option(
        False, "--allow-nonfinite", help="Evaluate even if weights hold NaN or inf."
    ),
    tasks: str = typer.Option(
        None,
        "--tasks",
        help="Task accuracy through lm-eval, comma-separated, e.g. arc_easy,arc_challenge,"
        "hellaswag,piqa,winogrande,lambada_openai. One model alone: tasks only; with a base: "
        "perplexity, KLD and tasks.",
    ),
    limit: int = typer.Option(None, "--limit", help="--tasks: the first N items of each task."),
    num_fewshot: int = typer.Option(
        None, "--num-fewshot", help="--tasks: examples before each item [default: 0]."
    ),
    seed: int = typer.Option(0, "--seed", help="--tasks: seed for few-shot sampling."),
    batch_size: int = typer.Option(
        64, "--batch-size", help="--tasks: requests handed to the backend at a time."
    ),
    online: bool = typer.Option(
        False, "--online", help="--tasks: lm-eval's own task definitions and the hub's data."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Perplexity on WikiText-2 (pinned protocol), KL divergence against a base, task accuracy.

    Protocol: the text is tokenized as one string (no BOS), cut into
    non-overlapping chunks of --ctx tokens, and each chunk is scored on its
    second half only, as llama.cpp's perplexity tool does. Several models give
    one record each (NDJSON with --json, for `cllm report`); the base's
    logits are computed once and cached.

    Example:

        cllm eval smollm2-135m --chunks 16

        cllm eval model.gguf --backend llama.cpp --kld-base smollm2-135m --chunks 16

        cllm eval smollm2-135m m1.gguf m2.gguf m3.onnx -b auto --json > results.ndjson

        cllm eval model.gguf --kld-base smollm2-135m --show-worst 5

        cllm eval model.gguf -b llama.cpp --tasks arc_easy,hellaswag,piqa --limit 500
    """
    _eval(
        checkpoints, backend.value, text, ctx, chunks, kld_base, base_backend.value, show_worst,
        threads, fail_under, max_kld, no_cache, allow_nonfinite, tasks, limit, num_fewshot, seed,
        batch_size, online, as_json,
    )  # fmt: skip


@handle_errors("eval")
def _eval(
    checkpoints: list[str], backend: str, text: Path | None, ctx: int, chunks: int | None,
    kld_base: str | None, base_backend: str, show_worst: int, threads: int | None,
    fail_under: str | None, max_kld: float | None, no_cache: bool, allow_nonfinite: bool,
    tasks: str | None, limit: int | None, num_fewshot: int | None, seed: int, batch_size: int,
    online: bool, as_json: bool,
) -> None:  # fmt: skip
    from cllm.core.eval.compare import CompareRequest, compare
    from cllm.core.eval.perplexity import EvalConfig
    from cllm.paths import default_eval_text

    if base_backend == "auto":
        raise UsageError("--base-backend auto is not a backend", "Use torch or llama.cpp")
    if show_worst < 0:
        raise UsageError("--show-worst must be 0 or more")
    ppl_bar, task_bars_spec = _split_bar(fail_under, bool(tasks))
    cfg = EvalConfig(text=str(text or default_eval_text()), ctx=ctx, chunks=chunks,
                     backend=backend, threads=threads)  # fmt: skip
    req = CompareRequest(checkpoints, cfg, backend, kld_base, base_backend, not no_cache,
                         allow_nonfinite, show_worst)  # fmt: skip
    if tasks:
        from cllm.core.tasks.run import TaskConfig, plan_tasks

        tcfg = TaskConfig(tasks=[], backend=backend, limit=limit, num_fewshot=num_fewshot,
                          seed=seed, batch_size=batch_size, threads=threads, online=online)  # fmt: skip
        req.tasks, req.task_bars = plan_tasks(tasks, task_bars_spec, tcfg)
    failed: list[str] = []
    records = []
    several = len(checkpoints) > 1
    with progress("evaluating", None) as advance:
        for rec, missed in compare(
            req,
            on_stage=lambda m: log(m, level=0 if several and m.startswith("[") else 1),
            on_chunk=lambda i, ppl: advance(description=f"chunk {i + 1}: ppl {ppl:.3f}"),
            on_tasks=lambda n: [advance() for _ in range(n)],
        ):
            failed += missed + _check(rec, ppl_bar, max_kld, several)
            if use_json(as_json):
                emit_json(rec)  # as each finishes: a long run shows its records as it goes
            records.append(rec)
    if not use_json(as_json):
        from cllm.cli.eval_tables import print_records

        print_records(records)
    if failed:
        raise CheckFailed("; ".join(failed))


def _split_bar(fail_under: str | None, with_tasks: bool) -> tuple[float | None, str | None]:
    """--fail-under X is a perplexity bar; METRIC=X bars are for --tasks."""
    if fail_under is None:
        return None, None
    try:
        return float(fail_under), None
    except ValueError:
        pass
    if not with_tasks:
        raise UsageError(
            f"--fail-under {fail_under} is not a perplexity",
            "Give a number; METRIC=X bars go with --tasks",
        )
    return None, fail_under


def _check(rec: dict[str, Any], ppl_bar: float | None, max_kld: float | None,
           several: bool) -> list[str]:  # fmt: skip
    who = f"{rec['name']}: " if several else ""
    out = []
    ppl = rec.get("perplexity")
    if ppl_bar is not None and ppl is not None and ppl > ppl_bar:
        out.append(f"{who}perplexity {ppl:.4f} is above --fail-under {ppl_bar}")
    if max_kld is not None:
        kld = rec.get("kld")
        if kld is None:
            out.append("--max-kld needs --kld-base")
        elif kld["mean"] > max_kld:
            out.append(f"{who}mean KLD {kld['mean']:.6f} is above --max-kld {max_kld}")
    return out
