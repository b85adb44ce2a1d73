"""The training loop, run through accelerate so that the same code trains on one CPU, one
GPU, or many processes (DDP; FSDP through an accelerate config) under `accelerate launch`.

One optimizer step takes `batch_size` windows (global: split evenly over the processes)
`grad_accum` times. Batches are a function of (seed, step) (see `data.py`), so a resumed
run and a multi-process run see exactly the windows a single uninterrupted run sees.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cllm.core.distill import losses as L
from cllm.core.distill import state as S
from cllm.core.distill.config import DistillConfig, parse_layer_map
from cllm.core.distill.data import TrainData
from cllm.core.distill.student import Student, apply_masks
from cllm.core.distill.teacher import LayerTap, Teacher, TopKCache, describe_difference
from cllm.core.job import Events, Silent
from cllm.errors import UsageError


@dataclass
class HeldOut:
    """WikiText-2 test chunks (DESIGN.md section 6 protocol) and the teacher's
    log-probabilities on them, computed once."""

    chunks: list[np.ndarray]
    ctx: int
    teacher_logprobs: dict[int, np.ndarray] = field(default_factory=dict)

    def get(self, i: int) -> np.ndarray | None:
        return self.teacher_logprobs.get(i)

    def put(self, i: int, lp: np.ndarray) -> None:
        self.teacher_logprobs[i] = lp


class Trainee(torch.nn.Module):
    """The student plus the projections its hidden states need to reach the teacher's
    width: one module, so that accelerate wraps (and synchronises) both. The matched
    layers' outputs come from forward hooks (`LayerTap`), as on the teacher's side."""

    def __init__(
        self,
        student: Any,
        projections: torch.nn.ModuleDict,
        tap: LayerTap | None = None,
    ) -> None:
        super().__init__()
        self.student = student
        self.projections = projections
        self.tap = tap

    def forward(
        self, ids: torch.Tensor, pairs: list[tuple[int, int]], attentions: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor], tuple[torch.Tensor, ...] | None]:
        out = self.student(input_ids=ids, use_cache=False, output_attentions=attentions)
        hidden = []
        if pairs:
            assert self.tap is not None
            for s, _t in pairs:
                h = self.tap.outputs[s]
                key = str(s)
                hidden.append(self.projections[key](h) if key in self.projections else h)
        return out.logits, hidden, out.attentions if attentions else None


def layer_pairs(
    cfg: DistillConfig, n_student: int, n_teacher: int, layers_from: list[int] | None
) -> list[tuple[int, int]]:
    """Student layer -> teacher layer whose outputs are matched. auto: the layer it was
    built from (--init), the same index when depths agree, else uniform spacing (student
    layer i -> teacher layer round((i + 1) T / S) - 1, so the last meets the last)."""
    if cfg.layer_map != "auto":
        pairs = parse_layer_map(cfg.layer_map)
        for s, t in pairs:
            if not (0 <= s < n_student and 0 <= t < n_teacher):
                raise UsageError(
                    f"--layer-map pair {s}:{t} is outside the student's {n_student} or the teacher's {n_teacher} layers"
                )
        return pairs
    if layers_from is not None and all(t < n_teacher for t in layers_from):
        return list(enumerate(layers_from))
    if n_student == n_teacher:
        return [(i, i) for i in range(n_student)]
    return [(i, round((i + 1) * n_teacher / n_student) - 1) for i in range(n_student)]


def lr_lambda(cfg: DistillConfig) -> Callable[[int], float]:
    """Linear warm-up, then a cosine from 1 down to `min_lr` at the last step."""
    warm = cfg.warmup_steps
    total = cfg.steps

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = (step - warm) / max(1, total - warm)
        return cfg.min_lr + (1.0 - cfg.min_lr) * 0.5 * (
            1.0 + math.cos(math.pi * min(1.0, progress))
        )

    return f


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    """auto: bf16 autocast where the hardware computes in bf16 natively, fp32 elsewhere
    (emulated bf16 on a CPU without it is slower than fp32)."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


@dataclass
class RunSetup:
    cfg: DistillConfig
    student: Student
    teacher: Teacher | None
    data: TrainData
    held_out: HeldOut | None
    cache: TopKCache | None
    state_folder: Path
    identity: dict[str, Any]  # what a resumed run must match
    job_id: str
    resume_from: S.Saved | None = None
    provenance: dict[str, Any] | None = None  # kept in each save, for a byte-identical resume
    on_step: Callable[[int, dict[str, float]], None] | None = None  # after each step


def train(setup: RunSetup, events: Events | None = None) -> dict[str, Any]:
    """Run the optimizer steps; return the report (per-step losses, evals, throughput)."""
    from accelerate import Accelerator

    from cllm.core.eval.backends import TorchBackend
    from cllm.core.eval.perplexity import evaluate

    events = events or Silent()
    cfg, student = setup.cfg, setup.student
    precision = resolve_precision(cfg.precision)
    _forget_accelerator_settings()
    # without a GPU, `cpu=True` is what makes accelerate join the processes a launcher
    # started (gloo); on its own it would run each as a separate single-process job
    acc = Accelerator(
        mixed_precision="bf16" if precision == "bf16" else "no", cpu=not torch.cuda.is_available()
    )
    _refuse_sharding(acc)
    world, rank = acc.num_processes, acc.process_index
    if cfg.batch_size % world:
        raise UsageError(
            f"--batch-size {cfg.batch_size} does not split over {world} processes",
            f"Use a multiple of {world}",
        )
    local = cfg.batch_size // world
    torch.manual_seed(cfg.seed)

    n_student = int(student.base.config.num_hidden_layers)
    teacher = setup.teacher
    if teacher is not None:
        teacher.device = acc.device
    student.masks = {k: m.to(acc.device) for k, m in student.masks.items()}
    n_teacher = int(teacher.config["num_hidden_layers"]) if teacher is not None else n_student
    pairs = layer_pairs(cfg, n_student, n_teacher, student.layers_from) if cfg.hidden_loss else []
    projections = torch.nn.ModuleDict()
    if pairs and teacher is not None:
        s_width = int(student.base.config.hidden_size)
        t_width = int(teacher.config["hidden_size"])
        if s_width != t_width:
            gen = torch.Generator().manual_seed(cfg.seed)
            for s, _t in pairs:
                proj = torch.nn.Linear(s_width, t_width, bias=False)
                with torch.no_grad():
                    proj.weight.copy_(
                        torch.randn(t_width, s_width, generator=gen) / math.sqrt(s_width)
                    )
                projections[str(s)] = proj
    attentions = cfg.attn_weight > 0
    if attentions and teacher is not None:
        s_heads = int(student.base.config.num_attention_heads)
        t_heads = int(teacher.config["num_attention_heads"])
        if s_heads != t_heads:
            raise UsageError(
                f"--attn-weight needs the same head count (student {s_heads}, teacher {t_heads})",
                "Drop --attn-weight for students with pruned heads",
            )
    att_pairs = layer_pairs(cfg, n_student, n_teacher, student.layers_from) if attentions else []
    tap = LayerTap(student.base, student.config, [s for s, _t in pairs]) if pairs else None
    trainee = Trainee(student.model, projections, tap)
    trainable = {n: p for n, p in trainee.named_parameters() if p.requires_grad}
    # fused: one kernel over all parameters. The per-tensor loop was a quarter of a step on
    # 2 cores (0.33 s against 0.07 s for SmolLM2's 115M parameters on the Intel Xeon)
    optimizer = torch.optim.AdamW(
        list(trainable.values()),
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        betas=(0.9, 0.95),
        fused=acc.device.type in ("cpu", "cuda"),  # where torch has the fused kernel
    )
    schedule = lr_lambda(cfg)
    start = 0
    history: list[dict[str, float]] = []
    evals: list[dict[str, Any]] = []
    if setup.resume_from is not None:
        saved = setup.resume_from
        diff = describe_difference(saved.meta.get("identity", {}), setup.identity)
        if diff:
            raise UsageError(
                f"--resume: the saved run used other settings ({diff})",
                "Run without --resume, or with the saved settings",
            )
        S.load(saved, trainable, optimizer)
        start = saved.step
        history = list(saved.meta.get("losses", []))
        evals = list(saved.meta.get("evals", []))
        events.log(f"resuming from step {start} ({saved.path})")
    model = acc.prepare(trainee)
    need_teacher_logits = cfg.alpha > 0 or bool(pairs) or attentions
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seqlen
    timings: list[float] = []

    def evaluate_now(step: int) -> None:
        if setup.held_out is None or teacher is None:
            return
        if acc.is_main_process:
            base = acc.unwrap_model(model).student
            base.eval()
            nll, kld, agree, _ = evaluate(
                TorchBackend.of(base), setup.held_out.chunks, setup.held_out.ctx,
                base=TorchBackend.of(teacher.model), base_cache=setup.held_out,
            )  # fmt: skip
            base.train()
            assert kld is not None and agree is not None
            rec = {
                "step": step,
                "ppl": float(math.exp(float(nll.astype(np.float64).mean()))),
                "kld": float(kld.astype(np.float64).mean()),
                "top1": float(agree.mean()),
            }
            evals.append(rec)
            events.log(
                f"step {step}: held-out ppl {rec['ppl']:.2f}, KLD {rec['kld']:.4f}, top-1 {rec['top1']:.1%}"
            )
        acc.wait_for_everyone()

    if start == 0 and cfg.eval_every:
        evaluate_now(0)
    log_every = max(1, cfg.log_every)
    with events.progress("distill", cfg.steps) as advance:
        for _ in range(start):
            advance()
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * schedule(step)
            sums = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "hidden": 0.0, "attn": 0.0}
            for micro in range(cfg.grad_accum):
                g = step * cfg.grad_accum + micro
                windows = setup.data.batch_indices(g, cfg.batch_size)[
                    rank * local : (rank + 1) * local
                ]
                ids = setup.data.windows[windows].to(acc.device)
                sync = micro == cfg.grad_accum - 1
                ctx = acc.no_sync(model) if not sync else _nullcontext()
                with ctx:
                    parts = _micro_loss(
                        cfg, model, teacher, setup.cache, windows, ids, pairs, att_pairs,
                        need_teacher_logits,
                    )  # fmt: skip
                    acc.backward(parts["loss"] / cfg.grad_accum)
                for k in sums:
                    sums[k] += float(parts[k].detach()) / cfg.grad_accum if k in parts else 0.0
            apply_masks(student, grads=True)
            if cfg.clip > 0:
                acc.clip_grad_norm_(list(trainable.values()), cfg.clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            apply_masks(student, grads=False)
            reduced = {
                k: float(acc.reduce(torch.tensor(v, device=acc.device), reduction="mean"))
                for k, v in sums.items()
            }
            reduced["lr"] = cfg.lr * schedule(step)
            history.append(reduced)
            dt = time.perf_counter() - t0
            timings.append(dt)
            rate = tokens_per_step / dt
            advance(description=f"distill · loss {reduced['loss']:.4f} · {rate:,.0f} tok/s")
            done = step + 1
            if done % log_every == 0 or done == cfg.steps:
                events.log(
                    f"step {done}/{cfg.steps}: loss {reduced['loss']:.4f} (kd {reduced['kd']:.4f}, ce {reduced['ce']:.4f}), {rate:,.0f} tokens/s",
                    level=1,
                )
            if cfg.eval_every and done % cfg.eval_every == 0:
                evaluate_now(done)
            if done % cfg.save_every == 0 and done < cfg.steps:
                if acc.is_main_process:
                    meta = {
                        "identity": setup.identity, "job_id": setup.job_id, "losses": history,
                        "evals": evals, "provenance": setup.provenance,
                    }  # fmt: skip
                    S.save(
                        setup.state_folder,
                        done,
                        _trainable(acc.unwrap_model(model)),
                        optimizer,
                        meta,
                    )
                acc.wait_for_everyone()
            if setup.on_step is not None:
                setup.on_step(done, reduced)
    if cfg.eval_every and cfg.steps % cfg.eval_every:  # the same decision on every rank
        evaluate_now(cfg.steps)
    if tap is not None:
        tap.close()
    steady = timings[1:] if len(timings) > 1 else timings
    report: dict[str, Any] = {
        "steps": cfg.steps,
        "resumed_from": start or None,
        "processes": world,
        "precision": precision,
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": tokens_per_step / float(np.median(steady)) if steady else None,
        "losses": history,
        "final": history[-1] if history else {},
        "evals": evals,
        "layer_pairs": pairs,
    }
    if setup.cache is not None:
        report["teacher_cache"] = {"hits": setup.cache.hits, "misses": setup.cache.misses}
        report["teacher_loaded"] = teacher is not None and teacher.loaded
    acc.wait_for_everyone()
    student.model = acc.unwrap_model(model).student
    acc.free_memory()
    return report


def _refuse_sharding(acc: Any) -> None:
    """Data parallel only: the loop saves, evaluates and resumes from full, unsharded
    weights on rank 0, which FSDP and DeepSpeed do not keep."""
    from accelerate.utils import DistributedType

    if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise UsageError(
            f"cllm distill does not run under {acc.distributed_type.value} yet",
            "Use data parallel: accelerate launch --multi_gpu (DDP)",
        )


def _forget_accelerator_settings() -> None:
    """accelerate keeps one process-wide state and refuses a second Accelerator with other
    settings (bf16 after fp32); a Python caller running several distillations in one
    process needs each run's own. The process group (PartialState) is kept."""
    from accelerate.state import AcceleratorState

    reset = getattr(AcceleratorState, "_reset_state", None)
    if reset is not None:
        reset()


def _trainable(trainee: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in trainee.named_parameters() if p.requires_grad}


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _micro_loss(
    cfg: DistillConfig,
    model: Any,
    teacher: Teacher | None,
    cache: TopKCache | None,
    windows: list[int],
    ids: torch.Tensor,
    pairs: list[tuple[int, int]],
    att_pairs: list[tuple[int, int]],
    need_teacher: bool,
) -> dict[str, torch.Tensor]:
    attentions = bool(att_pairs)
    t_out = None
    if need_teacher:
        if cache is not None:
            t_out = cache.get(windows, ids, teacher, cfg.temperature)
        elif teacher is not None:
            t_out = teacher(ids, layers=[t for _s, t in pairs], attentions=attentions)
            if cfg.top_k and t_out.logits is not None:
                # the loss a cache of the same k gives, rounded as the cache stores it
                values, idx = L.teacher_topk(t_out.logits, cfg.top_k, cfg.temperature)
                t_out.top_logp, t_out.top_ids = values.half().float(), idx
                t_out.logits = None
    logits, hidden, s_att = model(ids, pairs, attentions)
    parts: dict[str, torch.Tensor] = {}
    ce_grad = cfg.alpha < 1.0
    # at T = 1 the full-vocabulary divergence and the cross-entropy take one log-softmax
    full_kd = t_out is not None and t_out.logits is not None and cfg.alpha > 0
    logq = (
        torch.log_softmax(logits.float(), dim=-1)
        if full_kd and float(cfg.temperature) == 1.0
        else None
    )
    with torch.set_grad_enabled(ce_grad and torch.is_grad_enabled()):
        parts["ce"] = (
            L.cross_entropy(logits[:, :-1], ids[:, 1:])
            if logq is None
            else L.nll(logq[:, :-1], ids[:, 1:])
        )
    loss = (1.0 - cfg.alpha) * parts["ce"] if ce_grad else torch.zeros((), device=ids.device)
    if t_out is not None and cfg.alpha > 0:
        if t_out.logits is not None:
            kd = L.full_vocab_loss(
                cfg.loss, t_out.logits, logits, cfg.temperature, cfg.beta, student_logp=logq
            )
        else:
            assert t_out.top_logp is not None and t_out.top_ids is not None
            kd = L.topk_loss(
                cfg.loss, t_out.top_logp.to(logits.device), t_out.top_ids.to(logits.device),
                logits, cfg.temperature, cfg.beta,
            )  # fmt: skip
        parts["kd"] = kd
        loss = loss + cfg.alpha * kd
    if pairs and t_out is not None and t_out.hidden is not None:
        hid = torch.stack(
            [
                L.hidden_loss(str(cfg.hidden_loss), h, t_out.hidden[t])
                for h, (_s, t) in zip(hidden, pairs, strict=True)
            ]
        ).mean()
        parts["hidden"] = hid
        loss = loss + cfg.hidden_weight * hid
    if attentions and t_out is not None and t_out.attentions is not None and s_att is not None:
        att = torch.stack(
            [L.attention_loss(s_att[s], t_out.attentions[t]) for s, t in att_pairs]
        ).mean()
        parts["attn"] = att
        loss = loss + cfg.attn_weight * att
    parts["loss"] = loss
    return parts
