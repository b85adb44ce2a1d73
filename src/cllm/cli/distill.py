"""`cllm distill`: train a student to match its teacher's next-token distributions."""

from __future__ import annotations

from pathlib import Path

import typer

from cllm.cli._console import EVENTS, use_json
from cllm.cli._emit import emit_result
from cllm.cli._errors import handle_errors
from cllm.cli._options import DRY_RUN_OPTION, FORCE_OPTION, JSON_OPTION, output_option


def distill_cmd(
    checkpoint: str = typer.Argument(..., help="The student: model path, alias, or '-' for stdin."),
    teacher: str = typer.Option(..., "--teacher", "-t", help="The teacher: model path or alias."),
    loss: str = typer.Option("fkl", "--loss", help="fkl (forward KL), rkl (reverse KL) or jsd."),
    beta: float = typer.Option(0.5, "--beta", help="jsd: mixture weight, in (0, 1)."),
    temperature: float = typer.Option(
        1.0, "--temperature", "-T", help="Softens both distributions; the loss is scaled by T^2."
    ),
    alpha: float = typer.Option(
        1.0, "--alpha", help="Weight of distillation; 1 - alpha goes to cross-entropy on the data."
    ),
    hidden_loss: str = typer.Option(
        None, "--hidden-loss", help="Also match hidden states: mse or cosine."
    ),
    hidden_weight: float = typer.Option(
        1.0, "--hidden-weight", help="Weight of the hidden-state loss."
    ),
    layer_map: str = typer.Option(
        "auto", "--layer-map", help="Student:teacher layer pairs (0:1,1:3,...), or auto."
    ),
    attn_weight: float = typer.Option(
        0.0, "--attn-weight", help="Weight of attention-map transfer (same head counts only)."
    ),
    steps: int = typer.Option(300, "--steps", help="Optimizer steps."),
    batch_size: int = typer.Option(
        4, "--batch-size", "-b", help="Windows per step (global, split over processes)."
    ),
    grad_accum: int = typer.Option(
        1, "--grad-accum", help="Accumulate this many batches per step."
    ),
    seqlen: int = typer.Option(256, "--seqlen", help="Tokens per training window."),
    lr: float = typer.Option(1e-4, "--lr", help="Peak learning rate (AdamW)."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay."),
    warmup: int = typer.Option(-1, "--warmup", help="Warm-up steps [default: 5% of --steps]."),
    min_lr: float = typer.Option(0.1, "--min-lr", help="The cosine schedule ends at lr x this."),
    clip: float = typer.Option(1.0, "--clip", help="Gradient norm clipping (0: off)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the window order and any new weights."),
    data: Path = typer.Option(
        None, "--data", help="Training text [default: WikiText-2 validation, shipped data]."
    ),
    top_k: int = typer.Option(
        0, "--top-k", help="Distil the teacher's top k tokens plus a tail bucket (0: all)."
    ),
    teacher_cache: Path = typer.Option(
        None,
        "--teacher-cache",
        help="Folder for the teacher's top-k, computed once (needs --top-k).",
    ),
    teacher_dtype: str = typer.Option(
        "fp32", "--teacher-dtype", help="Teacher weights: fp32 or bf16."
    ),
    precision: str = typer.Option(
        "auto",
        "--precision",
        help="Student compute: auto (bf16 where the CPU/GPU has it), fp32, bf16.",
    ),
    freeze: list[str] = typer.Option(
        [], "--freeze", help="Regex of parameters not to train (repeatable)."
    ),
    lora_rank: int = typer.Option(
        0, "--lora-rank", help="Train LoRA adapters of this rank (merged when saved)."
    ),
    lora_alpha: int = typer.Option(0, "--lora-alpha", help="LoRA scaling [default: 2 x rank]."),
    keep_sparsity: bool = typer.Option(
        True, "--keep-sparsity/--no-keep-sparsity", help="Keep a pruned student's zeros."
    ),
    init: str = typer.Option(
        None, "--init", help="Build the student from some of its layers: layers:0,2,4,6."
    ),
    dequantize: bool = typer.Option(
        False, "--dequantize", help="Train a quantized student's dequantized weights."
    ),
    eval_every: int = typer.Option(
        0, "--eval-every", help="Held-out ppl and KLD every N steps (0: off)."
    ),
    eval_chunks: int = typer.Option(
        4, "--eval-chunks", help="WikiText-2 test chunks of 512 tokens for --eval-every."
    ),
    save_every: int = typer.Option(50, "--save-every", help="Save resumable state every N steps."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue an interrupted run from its last save."
    ),
    output: Path = output_option("<stem>.distill-<hash>"),
    force: bool = FORCE_OPTION,
    dry_run: bool = DRY_RUN_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Distil a teacher into a student: logits (KL, reverse KL, JSD), hidden states, attention.

    The student keeps its architecture and config, so the output quantizes, exports
    and benches like any checkpoint. It runs on a laptop CPU and, unchanged, under
    `accelerate launch` on several processes or GPUs (data parallel). See
    docs/distill.md.

    Example:

        student=$(cllm prune smollm2-135m --structured mlp --ratio 0.25 --dequantize)

        cllm distill "$student" --teacher smollm2-135m --steps 300 --eval-every 100

        cllm distill "$student" --teacher smollm2-135m --teacher-cache logits/ --top-k 64

        cllm distill smollm2-135m --teacher smollm2-135m --init layers:0-14 --dequantize

        accelerate launch --multi_gpu --num_processes 2 -m cllm distill "$student" -t smollm2-135m

        cllm distill "$student" -t smollm2-135m | cllm quantize - --method gptq --gguf-type Q4_0
    """
    _distill(
        checkpoint, teacher, loss, beta, temperature, alpha, hidden_loss, hidden_weight,
        layer_map, attn_weight, steps, batch_size, grad_accum, seqlen, lr, weight_decay, warmup,
        min_lr, clip, seed, data, top_k, teacher_cache, teacher_dtype, precision, freeze,
        lora_rank, lora_alpha, keep_sparsity, init, dequantize, eval_every, eval_chunks,
        save_every, resume, output, force, dry_run, as_json,
    )  # fmt: skip


@handle_errors("distill")
def _distill(
    checkpoint: str, teacher: str, loss: str, beta: float, temperature: float, alpha: float,
    hidden_loss: str | None, hidden_weight: float, layer_map: str, attn_weight: float,
    steps: int, batch_size: int, grad_accum: int, seqlen: int, lr: float, weight_decay: float,
    warmup: int, min_lr: float, clip: float, seed: int, data: Path | None, top_k: int,
    teacher_cache: Path | None, teacher_dtype: str, precision: str, freeze: list[str],
    lora_rank: int, lora_alpha: int, keep_sparsity: bool, init: str | None, dequantize: bool,
    eval_every: int, eval_chunks: int, save_every: int, resume: bool, output: Path | None,
    force: bool, dry_run: bool, as_json: bool,
) -> None:  # fmt: skip
    from cllm.core.distill.config import DistillConfig, parse_init
    from cllm.core.distill.job import DistillJob, DistillRequest, is_main_process
    from cllm.core.job import Silent, run_job

    cfg = DistillConfig(
        loss=loss, beta=beta, temperature=temperature, alpha=alpha, hidden_loss=hidden_loss,
        hidden_weight=hidden_weight, layer_map=layer_map, attn_weight=attn_weight, steps=steps,
        batch_size=batch_size, grad_accum=grad_accum, seqlen=seqlen, lr=lr,
        weight_decay=weight_decay, warmup=warmup, min_lr=min_lr, clip=clip, seed=seed,
        data=str(data) if data else None, top_k=top_k,
        teacher_cache=str(teacher_cache) if teacher_cache else None,
        teacher_dtype=teacher_dtype, precision=precision, freeze=list(freeze),
        lora_rank=lora_rank, lora_alpha=lora_alpha, keep_sparsity=keep_sparsity,
        init_layers=parse_init(init), dequantize=dequantize, eval_every=eval_every,
        eval_chunks=eval_chunks, save_every=save_every,
    )  # fmt: skip
    main = is_main_process()
    job = DistillJob(DistillRequest(teacher=teacher, cfg=cfg, resume=resume))
    result = run_job(
        job, checkpoint, output=output, force=force, dry_run=dry_run, resume=resume,
        events=EVENTS if main else Silent(),
    )  # fmt: skip
    if main:
        emit_result(result, use_json(as_json))
