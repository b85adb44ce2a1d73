#!/usr/bin/env python3
"""Peer for `cllm distill`: Hugging Face TRL's GKD trainer as plain off-policy logit distillation.

Run with the peer's own python (never cllm's venv):

    bench/peers/trl/.venv/bin/python bench/peers/trl_distill.py \
        --student DIR --teacher DIR --data FILE --steps N --batch-size B --seqlen L \
        --lr LR --seed S --out DIR --json RESULT.json \
        [--grad-accum K] [--threads T] [--adam-beta2 0.999] [--min-lr-rate 0] [--warmup W]

What it runs: `trl.experimental.gkd.GKDTrainer` (TRL 1.16.0; GKD lives in `trl.experimental`,
the stable `trl.DistillationTrainer` is on-policy only: it always generates completions from a
"prompt" column and cannot train on fixed text) with `GKDConfig(lmbda=0.0, beta=0.0,
temperature=1.0, seq_kd=False)`:

- lmbda=0: `training_step` draws `random.random() <= lmbda`, so the student never generates;
  seq_kd=False: the teacher never generates either. Every step trains on the given windows.
- beta=0: `GKDTrainer.generalized_jsd_loss` takes the branch
  `F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)`, i.e.
  per position sum_v p_t(v) (log p_t(v) - log p_s(v)) = KL(teacher || student), forward KL.
  (beta=1 is KL(student || teacher); 0<beta<1 is beta KL(t||m) + (1-beta) KL(s||m) with
  m = beta p_t + (1-beta) p_s.) The loss is summed over the vocabulary and over the valid
  positions and divided by `num_items_in_batch` (the Trainer's count of labels[..., 1:] != -100
  over the global batch), i.e. the mean per-token forward KL in nats.
- temperature: `compute_loss` does not pass `args.temperature` to the loss (it is used only for
  sampling, which lmbda=0 never does), so the loss is always at temperature 1. We set 1.0 anyway.

Data: the whole --data file, tokenized as one string with the student's tokenizer without
special tokens, cut into non-overlapping windows of --seqlen tokens (short tail dropped). The
window order is cllm's (`cllm.core.distill.data.TrainData`): epoch e visits the windows in
`torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + e))`, batches run on
across epochs. Exactly steps x batch windows are laid out in that order and fed with the
Trainer's sequential sampler, so with the same tokenizer both tools see the same batches.
GKDTrainer's default collator (`DataCollatorForChatML`) wants chat "messages"; we pass a custom
collator instead that returns input_ids [b, L], attention_mask all ones and labels = input_ids
(every position), so the loss covers all L-1 next-token positions of every window exactly as
for plain windows: no chat template, no special tokens, no padding, no prompt masking.

Optimizer and schedule (Trainer defaults, set explicitly): AdamW (torch, fused:
`adamw_torch_fused`, as cllm), betas (0.9, --adam-beta2, default 0.999), eps 1e-8, weight
decay 0, gradient clipping 1.0, linear warm-up over --warmup steps (default
round(0.05 * steps), like cllm) from 0, then cosine down to --min-lr-rate x lr (default 0,
Trainer's "cosine"; >0 uses "cosine_with_min_lr"). fp32 on CPU, no gradient checkpointing
(TRL's configs default it on), bf16 autocast only with --bf16 (TRL's configs default it on;
the bench passes it when it compares against cllm's bf16 autocast), no evaluation, no
checkpoints, no reporting; progress goes to stderr only (stdout is
redirected to stderr for the whole run).

RESULT.json: versions, trainer class and config, steps/batch/seqlen, `train_seconds` (wall
time of `trainer.train()` alone), `tokens_per_second` = steps*batch*seqlen / train_seconds,
`tokens_per_second_median_step` (batch*seqlen over the median optimizer step after the first,
the way cllm reports its rate),
`final_loss` (loss of the last step), per-step losses, and `error` (null, or exception type
and message plus `traceback` tail; exit code 1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "WANDB_DISABLED": "true",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_k, _v)


def log(msg: str) -> None:
    print(f"[trl_distill] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", required=True, help="HF folder of the student (fp32 Llama)")
    p.add_argument("--teacher", required=True, help="HF folder of the teacher (same vocabulary)")
    p.add_argument("--data", required=True, help="plain text file")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--batch-size", type=int, required=True, help="global batch, in windows")
    p.add_argument("--seqlen", type=int, required=True, help="tokens per window")
    p.add_argument("--lr", type=float, required=True, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output HF folder for the trained student")
    p.add_argument("--json", required=True, help="result JSON path")
    p.add_argument(
        "--grad-accum",
        type=int,
        default=1,
        help="micro-batches per optimizer step (batch-size must divide by it)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument(
        "--bf16",
        action="store_true",
        help="bf16 autocast (Trainer's bf16=True), to match cllm's --precision bf16",
    )
    p.add_argument("--adam-beta2", type=float, default=0.999)
    p.add_argument(
        "--min-lr-rate",
        type=float,
        default=0.0,
        help="cosine ends at lr x this (0 = Trainer's plain cosine)",
    )
    p.add_argument("--warmup", type=int, default=-1, help="warm-up steps; -1 = round(5%% of steps)")
    a = p.parse_args(argv)
    for name in ("steps", "batch_size", "seqlen", "grad_accum"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.batch_size % a.grad_accum:
        p.error("--batch-size must be a multiple of --grad-accum")
    if a.seqlen < 2:
        p.error("--seqlen must be >= 2")
    return a


def window_order(n: int, seed: int, steps: int, batch: int):
    """cllm's order: epoch e is randperm(n) seeded with seed*100003+e; batches run across epochs."""
    import torch

    total = steps * batch
    out: list[int] = []
    epoch = 0
    while len(out) < total:
        gen = torch.Generator().manual_seed(seed * 100003 + epoch)
        out.extend(torch.randperm(n, generator=gen).tolist())
        epoch += 1
    return out[:total], epoch


class WindowCollator:
    """Fixed-length token windows -> input_ids, attention_mask (ones), labels (= input_ids)."""

    def __call__(self, examples):
        import torch

        ids = torch.tensor([e["input_ids"] for e in examples], dtype=torch.long)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": ids.clone(),
        }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run(a: argparse.Namespace, result: dict) -> None:
    result["stage"] = "import"
    t0 = time.perf_counter()
    import numpy as np
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    import accelerate
    import datasets
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    result["versions"] = {
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
        "python": sys.version.split()[0],
    }
    result["torch_threads"] = torch.get_num_threads()
    result["import_seconds"] = round(time.perf_counter() - t0, 3)
    log(f"versions {result['versions']}, torch threads {torch.get_num_threads()}")

    # ---- data
    result["stage"] = "data"
    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(a.student)
    text = Path(a.data).read_text(encoding="utf-8")
    ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    n = len(ids) // a.seqlen
    if n < a.batch_size:
        raise ValueError(
            f"{a.data} has {len(ids)} tokens: {n} windows of {a.seqlen}, fewer than one batch of {a.batch_size}"
        )
    windows = ids[: n * a.seqlen].reshape(n, a.seqlen)
    order, epochs = window_order(n, a.seed, a.steps, a.batch_size)
    ds = datasets.Dataset.from_dict({"input_ids": windows[order].tolist()})
    result["data"] = {
        "path": str(a.data),
        "tokens": int(len(ids)),
        "windows": int(n),
        "windows_used": len(order),
        "epochs_touched": epochs,
        "order": "cllm: randperm(n, seed*100003+epoch) per epoch, sequential sampler",
    }
    result["data_seconds"] = round(time.perf_counter() - t, 3)
    log(
        f"data: {len(ids)} tokens -> {n} windows of {a.seqlen}; {len(order)} used ({epochs} epoch(s) touched)"
    )

    # ---- models
    result["stage"] = "load"
    t = time.perf_counter()
    torch.manual_seed(a.seed)
    student = AutoModelForCausalLM.from_pretrained(a.student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(a.teacher, dtype=torch.float32)
    student_use_cache = getattr(student.config, "use_cache", True)
    teacher.config.use_cache = False
    teacher.eval()
    teacher.requires_grad_(False)
    result["load_seconds"] = round(time.perf_counter() - t, 3)
    result["student_params"] = sum(p.numel() for p in student.parameters())
    result["teacher_params"] = sum(p.numel() for p in teacher.parameters())
    log(
        f"loaded student {result['student_params']:,} params, teacher {result['teacher_params']:,} params "
        f"in {result['load_seconds']:.1f} s"
    )

    warmup = max(0, round(0.05 * a.steps)) if a.warmup < 0 else a.warmup
    if a.min_lr_rate > 0:
        sched, sched_kwargs = "cosine_with_min_lr", {"min_lr_rate": a.min_lr_rate}
    else:
        sched, sched_kwargs = "cosine", None
    micro = a.batch_size // a.grad_accum
    cfg_kwargs = dict(
        output_dir=str(a.out),
        # distillation
        lmbda=0.0,
        beta=0.0,
        temperature=1.0,
        seq_kd=False,
        disable_dropout=True,
        max_length=a.seqlen,
        # schedule and optimizer
        max_steps=a.steps,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=a.grad_accum,
        learning_rate=a.lr,
        lr_scheduler_type=sched,
        lr_scheduler_kwargs=sched_kwargs,
        warmup_steps=warmup,
        optim="adamw_torch_fused",  # the Trainer's default in transformers 5
        adam_beta1=0.9,
        adam_beta2=a.adam_beta2,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=a.seed,
        data_seed=a.seed,
        # precision / device
        use_cpu=True,
        bf16=a.bf16,
        fp16=False,
        gradient_checkpointing=False,
        # data plumbing
        train_sampling_strategy="sequential",
        shuffle_dataset=False,
        packing=False,
        padding_free=False,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        dataloader_num_workers=0,
        dataloader_drop_last=True,
        dataloader_pin_memory=False,
        # no eval, no saving, no reporting
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        logging_strategy="steps",
        logging_steps=1,
        disable_tqdm=True,
    )
    args = GKDConfig(**cfg_kwargs)

    losses: list[dict] = []

    step_seconds = []

    class StepTimer(TrainerCallback):
        """Per optimizer step, as cllm times its steps: the median step is comparable."""

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_seconds.append(time.perf_counter() - self.t0)

    class StderrLog(TrainerCallback):
        def __init__(self):
            self.t = None

        def on_train_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                el = time.perf_counter() - self.t
                rec = {
                    "step": state.global_step,
                    "loss": float(logs["loss"]),
                    "lr": float(logs.get("learning_rate", float("nan"))),
                    "grad_norm": float(logs.get("grad_norm", float("nan"))),
                    "elapsed": round(el, 3),
                }
                losses.append(rec)
                tps = state.global_step * a.batch_size * a.seqlen / max(el, 1e-9)
                log(
                    f"step {state.global_step}/{a.steps}: loss {rec['loss']:.4f} lr {rec['lr']:.3g} "
                    f"grad_norm {rec['grad_norm']:.3g} ({tps:,.0f} tokens/s so far)"
                )

    result["stage"] = "trainer"
    trainer = GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        data_collator=WindowCollator(),
        train_dataset=ds,
        processing_class=tok,
        callbacks=[StepTimer(), StderrLog()],
    )
    result["trainer"] = f"{type(trainer).__module__}.{type(trainer).__qualname__}"
    result["config"] = {
        "class": f"{type(args).__module__}.{type(args).__qualname__}",
        "lmbda": args.lmbda,
        "beta": args.beta,
        "temperature": args.temperature,
        "seq_kd": args.seq_kd,
        "loss": "forward KL(teacher||student) per token, mean over all L-1 positions of each window (nats)",
        "max_steps": args.max_steps,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "lr_scheduler_kwargs": args.lr_scheduler_kwargs,
        "warmup_steps": args.get_warmup_steps(a.steps),
        "optim": str(getattr(args.optim, "value", args.optim)),
        "adam_betas": [args.adam_beta1, args.adam_beta2],
        "adam_epsilon": args.adam_epsilon,
        "weight_decay": args.weight_decay,
        "max_grad_norm": args.max_grad_norm,
        "bf16": args.bf16,
        "fp16": args.fp16,
        "gradient_checkpointing": args.gradient_checkpointing,
        "use_cpu": args.use_cpu,
        "seed": args.seed,
        "train_sampling_strategy": str(args.train_sampling_strategy),
        "collator": "WindowCollator: input_ids, attention_mask=1, labels=input_ids",
        "device": str(args.device),
    }
    log(
        f"trainer {result['trainer']} lmbda={args.lmbda} beta={args.beta} temperature={args.temperature}, "
        f"{a.steps} steps x {a.batch_size} windows x {a.seqlen} tokens, warm-up {result['config']['warmup_steps']}"
    )

    # ---- train
    result["stage"] = "train"
    result["loadavg_start"] = list(os.getloadavg())
    cpu0 = time.process_time()
    t = time.perf_counter()
    out = trainer.train()
    result["train_seconds"] = round(time.perf_counter() - t, 3)
    result["cpu_seconds"] = round(time.process_time() - cpu0, 3)
    result["loadavg_end"] = list(os.getloadavg())
    if trainer.state.global_step != a.steps:
        raise RuntimeError(f"trainer stopped at step {trainer.state.global_step}, not {a.steps}")
    tokens = a.steps * a.batch_size * a.seqlen
    result["train_tokens"] = tokens
    result["tokens_per_second"] = round(tokens / result["train_seconds"], 2)
    steady = sorted(step_seconds[1:] or step_seconds)
    if steady:  # the median step after the first, as cllm reports its own rate
        median = steady[len(steady) // 2]
        result["tokens_per_second_median_step"] = round(a.batch_size * a.seqlen / median, 2)
    result["final_loss"] = losses[-1]["loss"] if losses else None
    result["mean_loss"] = float(out.training_loss)
    result["losses"] = losses
    result["trainer_metrics"] = {
        k: v for k, v in out.metrics.items() if isinstance(v, (int, float))
    }
    log(
        f"trained {a.steps} steps in {result['train_seconds']:.1f} s: {result['tokens_per_second']:,.0f} tokens/s, "
        f"final loss {result['final_loss']}"
    )

    # ---- save
    result["stage"] = "save"
    t = time.perf_counter()
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.config.use_cache = student_use_cache
    Path(a.out).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(a.out, safe_serialization=True)
    tok.save_pretrained(a.out)
    result["save_seconds"] = round(time.perf_counter() - t, 3)
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    log(f"saved to {a.out} in {result['save_seconds']:.1f} s")
    result["stage"] = "done"


def main(argv=None) -> int:
    a = parse_args(argv)
    result: dict = {
        "tool": "trl",
        "trainer": "trl.experimental.gkd.GKDTrainer",
        "config": {"lmbda": 0.0, "beta": 0.0, "temperature": 1.0},
        "student": str(a.student),
        "teacher": str(a.teacher),
        "steps": a.steps,
        "batch": a.batch_size,
        "seqlen": a.seqlen,
        "grad_accum": a.grad_accum,
        "lr": a.lr,
        "seed": a.seed,
        "out": str(a.out),
        "error": None,
    }
    t_all = time.perf_counter()
    code = 0
    with contextlib.redirect_stdout(sys.stderr):
        try:
            run(a, result)
        except BaseException as e:  # noqa: BLE001 - report every failure in the JSON
            if isinstance(e, KeyboardInterrupt):
                result["interrupted"] = True
            result["error"] = f"{type(e).__name__}: {e}"
            result["traceback"] = traceback.format_exc().strip().splitlines()[-15:]
            log(f"FAILED at stage {result.get('stage')}: {result['error']}")
            traceback.print_exc(file=sys.stderr)
            code = 1
    result["total_seconds"] = round(time.perf_counter() - t_all, 3)
    result.setdefault("peak_rss_mb", round(peak_rss_mb(), 1))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(a.json) + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(tmp, a.json)
    return code


if __name__ == "__main__":
    sys.exit(main())
