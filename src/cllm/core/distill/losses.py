"""Distillation losses.

Divergences compare the teacher's next-token distribution p with the student's q, both
softened by a temperature T and multiplied by T^2 (Hinton et al., 2015) so that the
gradient scale does not shrink as T grows:

- fkl: KL(p || q), mean-seeking: the student spreads over everything the teacher allows.
- rkl: KL(q || p), mode-seeking: the student concentrates on the teacher's main modes
  (MiniLLM, Gu et al. 2024).
- jsd: generalised Jensen-Shannon with weight beta (GKD, Agarwal et al. 2024):
  beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q. beta -> 0 behaves
  like fkl, beta -> 1 like rkl, up to scale.

Each comes in two shapes: over the full vocabulary (on-the-fly teacher), and over a
teacher stored as its top-k log-probabilities (`--teacher-cache`). In the second, the
vocabulary is partitioned into the k stored tokens plus one tail bucket holding the
rest; both distributions are coarsened to those k + 1 outcomes (the student's tail mass
is 1 - its mass on the k tokens) and the divergence is taken between the coarsened
distributions. That is exact for the coarsened pair and, by the data-processing
inequality, never larger than the full-vocabulary divergence; it equals it when the
teacher's tail is empty.

All functions take log-probabilities and return the mean over positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

DIVERGENCES = ("fkl", "rkl", "jsd")
_LOG_FLOOR = math.log(1e-30)
HIDDEN_LOSSES = ("mse", "cosine")


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """sum_i p_i (log p_i - log q_i) along the last axis, with 0 log 0 = 0."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), 0.0).sum(-1)


def _jsd(logp: torch.Tensor, logq: torch.Tensor, beta: float) -> torch.Tensor:
    # beta in (0, 1), checked by the config
    logm = torch.logsumexp(torch.stack([logp + math.log(beta), logq + math.log1p(-beta)]), dim=0)
    return beta * _kl(logp, logm) + (1.0 - beta) * _kl(logq, logm)


def divergence(
    kind: str, teacher_logp: torch.Tensor, student_logp: torch.Tensor, beta: float = 0.5
) -> torch.Tensor:
    """Per-position divergence between two log-distributions over the same outcomes."""
    if kind == "fkl":
        return _kl(teacher_logp, student_logp)
    if kind == "rkl":
        return _kl(student_logp, teacher_logp)
    if kind == "jsd":
        return _jsd(teacher_logp, student_logp, beta)
    raise ValueError(f"unknown divergence {kind!r}")


def full_vocab_loss(
    kind: str,
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    temperature: float,
    beta: float = 0.5,
    mask: torch.Tensor | None = None,
    student_logp: torch.Tensor | None = None,
) -> torch.Tensor:
    """T^2 x mean divergence over positions (where `mask` is true). `student_logp`: the
    student's log-softmax at this temperature when the caller has it already (the
    cross-entropy at T = 1 needs the same one, and a vocabulary-wide pass is not free)."""
    t = float(temperature)
    logp = F.log_softmax(teacher_logits.float() / t, dim=-1)
    logq = (
        student_logp
        if student_logp is not None
        else F.log_softmax(student_logits.float() / t, dim=-1)
    )
    per = divergence(kind, logp, logq, beta)
    return t * t * _masked_mean(per, mask)


def coarsen_student(
    student_logits: torch.Tensor, indices: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The student's log-probabilities of the k stored tokens and of the tail bucket
    ([..., k + 1]), at the temperature. The tail is a log-sum-exp over the other tokens
    rather than log(1 - mass): exact however small it is, and its gradient never vanishes."""
    logq = F.log_softmax(student_logits.float() / float(temperature), dim=-1)
    idx = indices.long()
    top = logq.gather(-1, idx)
    rest = logq.scatter(-1, idx, float("-inf")).logsumexp(-1, keepdim=True)
    # k = vocabulary leaves no tail: a finite floor keeps 0 x log 0 from becoming inf
    return torch.cat([top, rest.clamp(min=_LOG_FLOOR)], dim=-1)


def coarsen_teacher(top_logp: torch.Tensor) -> torch.Tensor:
    """The stored top-k log-probabilities plus the tail bucket ([..., k + 1])."""
    top = top_logp.float()
    return torch.cat([top, _log_rest(top).unsqueeze(-1)], dim=-1)


def _log_rest(top_logp: torch.Tensor) -> torch.Tensor:
    """log(1 - sum exp(top)), clamped so a tail rounded to zero stays finite."""
    mass = torch.logsumexp(top_logp, dim=-1).clamp(max=0.0)
    # log(1 - e^x) = log(-expm1(x)), accurate for x near 0
    return torch.log((-torch.expm1(mass)).clamp(min=1e-12))


def topk_loss(
    kind: str,
    top_logp: torch.Tensor,
    indices: torch.Tensor,
    student_logits: torch.Tensor,
    temperature: float,
    beta: float = 0.5,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """T^2 x mean divergence between the coarsened teacher and student (see the module)."""
    t = float(temperature)
    logp = coarsen_teacher(top_logp)
    logq = coarsen_student(student_logits, indices, t)
    return t * t * _masked_mean(divergence(kind, logp, logq, beta), mask)


def teacher_topk(
    teacher_logits: torch.Tensor, k: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k log-probabilities at the temperature and their token ids."""
    logp = F.log_softmax(teacher_logits.float() / float(temperature), dim=-1)
    values, indices = logp.topk(k, dim=-1)
    return values, indices


def nll(
    student_logp: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """`cross_entropy` from log-probabilities already computed (at temperature 1)."""
    per = -student_logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return _masked_mean(per, mask)


def cross_entropy(
    student_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token cross-entropy on the data: logits at t predict labels at t."""
    per = F.cross_entropy(
        student_logits.float().reshape(-1, student_logits.shape[-1]),
        labels.reshape(-1),
        reduction="none",
    ).reshape(labels.shape)
    return _masked_mean(per, mask)


def hidden_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Hidden-state matching for one layer pair (student already projected to the
    teacher's width): mean squared error, or 1 - cosine similarity per position."""
    s, t = student.float(), teacher.float()
    if kind == "mse":
        return F.mse_loss(s, t)
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
    raise ValueError(f"unknown hidden loss {kind!r}")


def attention_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) between attention distributions ([batch, heads, q, k]),
    averaged over heads and query positions (MiniLM, Wang et al. 2020)."""
    eps = 1e-12
    t = teacher.float().clamp(min=eps)
    s = student.float().clamp(min=eps)
    return (t * (t.log() - s.log())).sum(-1).mean()


def _masked_mean(per: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per.mean()
    m = mask.to(per.dtype)
    return (per * m).sum() / m.sum().clamp(min=1.0)


LossFn = Callable[..., torch.Tensor]
