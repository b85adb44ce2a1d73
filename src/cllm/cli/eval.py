"""`cllm eval`: perplexity and KL divergence under the pinned protocol."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from cllm.cli._common import (
    JSON_OPTION,
    emit_json,
    handle_errors,
    log,
    out_console,
    progress,
    use_json,
)
from cllm.errors import CheckFailed, UsageError

if TYPE_CHECKING:
    from cllm.core.eval.perplexity import EvalResult


class BackendName(str, Enum):
    torch = "torch"
    llamacpp = "llama.cpp"
    onnxruntime = "onnxruntime"


def eval_cmd(
    checkpoint: str = typer.Argument(..., help="Model path, alias, or '-' for stdin."),
    backend: BackendName = typer.Option(
        BackendName.torch,
        "--backend",
        "-b",
        help="torch (dequantized weights), llama.cpp (the GGUF's own kernels) or onnxruntime (ONNX exports; picked for them).",
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
        help="Task accuracy through lm-eval instead of perplexity: comma-separated, e.g. "
        "arc_easy,arc_challenge,hellaswag,piqa,winogrande,lambada_openai.",
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
    """Perplexity on WikiText-2 (pinned protocol) and KL divergence against a base.

    Protocol: the text is tokenized as one string (no BOS), cut into
    non-overlapping chunks of --ctx tokens, and each chunk is scored on its
    second half only, as llama.cpp's perplexity tool does.

    Example:

        cllm eval smollm2-135m --chunks 16

        cllm eval model.gguf --backend llama.cpp --kld-base smollm2-135m --chunks 16

        cllm eval model.gguf -b llama.cpp --tasks arc_easy,hellaswag,piqa --limit 500
    """
    if tasks:
        _tasks(checkpoint, backend.value, tasks, limit, num_fewshot, seed, batch_size, threads,
               online, fail_under, as_json)  # fmt: skip
        return
    _eval(
        checkpoint, backend.value, text, ctx, chunks, kld_base, base_backend.value, threads,
        fail_under, max_kld, no_cache, allow_nonfinite, as_json,
    )  # fmt: skip


@handle_errors("eval")
def _eval(
    checkpoint: str,
    backend: str,
    text: Path | None,
    ctx: int,
    chunks: int | None,
    kld_base: str | None,
    base_backend: str,
    threads: int | None,
    fail_under: str | None,
    max_kld: float | None,
    no_cache: bool,
    allow_nonfinite: bool,
    as_json: bool,
) -> None:
    from cllm.core.eval.perplexity import EvalConfig
    from cllm.core.eval.run import run_eval
    from cllm.formats.inputs import CHECKPOINT, ONNX, resolve_input
    from cllm.paths import default_eval_text

    text_path = text or default_eval_text()
    src = resolve_input(checkpoint, accept=(CHECKPOINT, ONNX))
    model: Any
    if src.kind == ONNX:  # torch cannot run a graph: an ONNX export goes to onnxruntime
        model = src.onnx
        if backend == "torch":
            backend = "onnxruntime"
    else:
        model = src.checkpoint
    base = resolve_input(kld_base).checkpoint if kld_base else None
    cfg = EvalConfig(text=str(text_path), ctx=ctx, chunks=chunks, backend=backend, threads=threads)
    total = chunks
    with progress("evaluating", total) as advance:
        result = run_eval(
            model,
            cfg,
            kld_base=base,
            base_backend=base_backend,
            use_cache=not no_cache,
            allow_nonfinite=allow_nonfinite,
            on_stage=lambda m: log(m, level=1),
            on_chunk=lambda i, ppl: advance(description=f"chunk {i + 1}: ppl {ppl:.3f}"),
        )
    if use_json(as_json):
        emit_json(result.to_dict())
    else:
        _print_table(result)
    if fail_under is not None:
        try:
            bar = float(fail_under)
        except ValueError:
            raise UsageError(
                f"--fail-under {fail_under} is not a perplexity",
                "Give a number; METRIC=X bars go with --tasks",
            ) from None
        if result.perplexity > bar:
            raise CheckFailed(f"perplexity {result.perplexity:.4f} is above --fail-under {bar}")
    if max_kld is not None:
        if result.kld is None:
            raise CheckFailed("--max-kld needs --kld-base")
        if result.kld.mean > max_kld:
            raise CheckFailed(f"mean KLD {result.kld.mean:.6f} is above --max-kld {max_kld}")


@handle_errors("eval")
def _tasks(
    checkpoint: str, backend: str, names: str, limit: int | None, num_fewshot: int | None,
    seed: int, batch_size: int, threads: int | None, online: bool, fail_under: str | None,
    as_json: bool,
) -> None:  # fmt: skip
    from cllm.core.tasks.run import TaskConfig, task_job

    cfg = TaskConfig(tasks=[], backend=backend, limit=limit, num_fewshot=num_fewshot,
                     seed=seed, batch_size=batch_size, threads=threads, online=online)  # fmt: skip
    with progress("scoring task requests", None) as advance:
        result, failed = task_job(
            checkpoint, names, fail_under, cfg, on_progress=lambda n: [advance() for _ in range(n)]
        )
    if use_json(as_json):
        emit_json(result.to_dict())
    else:
        _print_tasks(result)
    if failed:
        raise CheckFailed("; ".join(failed))


def _print_tasks(result: Any) -> None:
    from rich.table import Table

    table = Table(title=f"{result.model} ({result.backend})", title_justify="left")
    for col in ("task", "metric", "value", "± stderr", "items", "shots"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for name, r in result.tasks.items():
        for metric, value in r.items():
            if metric.endswith("_stderr") or metric in ("samples", "num_fewshot"):
                continue
            se = r.get(f"{metric}_stderr")
            table.add_row(name, metric, f"{value:.4f}", "" if se is None else f"{se:.4f}",
                          str(r.get("samples")), str(r.get("num_fewshot")))  # fmt: skip
    out_console().print(table)
    p = result.protocol
    out_console().print(f"lm-eval {p['lm_eval']}, {p['task_source']}, seed {p['seed']}")


def _print_table(r: EvalResult) -> None:
    from rich.table import Table

    con = out_console()
    p = r.protocol
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("model", f"{r.model} ({r.backend})")
    table.add_row("perplexity", f"{r.perplexity:.4f} ± {r.perplexity_se:.4f}")
    k = r.kld
    if k is not None:
        table.add_row("base", f"{k.base} ({k.base_backend}), perplexity {r.base_perplexity:.4f}")
        table.add_row("mean KLD", f"{k.mean:.6f} ± {k.mean_se:.6f}")
        table.add_row("KLD median / p99 / max", f"{k.median:.6f} / {k.p99:.6f} / {k.max:.6f}")
        table.add_row("top-1 agreement", f"{k.top1_agreement * 100:.2f}%")
    table.add_row(
        "protocol",
        f"{p['text']} (sha256 {p['text_sha256'][:12]}), ctx {p['ctx']}, {p['chunks']} chunks, "
        f"{p['tokens_scored']} tokens scored (second half of each chunk)",
    )
    con.print(table)
