"""Perplexity and KL divergence under one pinned protocol (DESIGN.md section 6).

Protocol: the text is tokenized as one string with no special tokens added; it is
cut into non-overlapping chunks of `ctx` tokens from the start; in each chunk the
first half is context only and the model is scored on predicting tokens
ctx/2+1 .. ctx-1 from the logits at positions ctx/2 .. ctx-2, as llama.cpp's
perplexity tool does. That is ctx/2 - 1 scored tokens per chunk.

KL divergence compares the base's and the model's log-probabilities at the same
scored positions. Both sides are rounded to float16 log-probabilities first (the
precision the base cache stores), so a model compared with itself gives exactly 0.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cllm.core.eval.backends import Backend
from cllm.errors import InputError
from cllm.paths import cache_dir

PROTOCOL_VERSION = 1


@dataclass
class EvalConfig:
    """Everything that defines the numbers; recorded with every result."""

    text: str
    ctx: int = 512
    chunks: int | None = None
    backend: str = "torch"
    threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalConfig:
        return cls(**d)


@dataclass
class KLDResult:
    mean: float
    mean_se: float
    median: float
    p90: float
    p99: float
    max: float
    top1_agreement: float
    base: str
    base_sha256: str
    base_backend: str


@dataclass
class EvalResult:
    model: str
    model_sha256: str
    backend: str
    perplexity: float
    perplexity_se: float
    nll_mean: float
    protocol: dict[str, Any]
    kld: KLDResult | None = None
    base_perplexity: float | None = None
    per_chunk_nll: list[float] = field(default_factory=list)
    # --show-worst: the scored positions where the model departs most from the base
    worst: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("per_chunk_nll")
        if d["worst"] is None:
            d.pop("worst")
        return d


def scored_logprobs(logits: np.ndarray, ctx: int) -> np.ndarray:
    """float16-rounded log-softmax at the scored positions (ctx/2 .. ctx-2)."""
    import torch

    first = ctx // 2
    x = torch.from_numpy(np.ascontiguousarray(logits[first : ctx - 1], dtype=np.float32))
    lp = torch.log_softmax(x, dim=-1)
    return lp.to(torch.float16).numpy()


class BaseLogprobCache:
    """Base log-probabilities per chunk, float16, on disk, keyed by base hash and protocol."""

    def __init__(self, key: dict[str, Any], enabled: bool = True, root: Path | None = None) -> None:
        import hashlib

        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        self.dir = (root or cache_dir() / "base-logprobs") / digest
        self.enabled = enabled
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "key.json").write_text(json.dumps(key, sort_keys=True, indent=1))

    def _path(self, i: int) -> Path:
        return self.dir / f"chunk-{i:05d}.npy"

    def get(self, i: int) -> np.ndarray | None:
        if not self.enabled or not self._path(i).exists():
            return None
        try:
            return np.load(self._path(i))
        except (OSError, ValueError):
            return None

    def put(self, i: int, lp: np.ndarray) -> None:
        if not self.enabled:
            return
        tmp = self.dir / f".chunk-{i:05d}.{os.getpid()}.tmp.npy"
        np.save(tmp, lp)
        os.replace(tmp, self._path(i))


def _mean_se(values: np.ndarray) -> tuple[float, float]:
    n = len(values)
    mean = float(values.mean())
    if n < 2:
        return mean, 0.0
    var = float((values.astype(np.float64) ** 2).mean() - mean**2)
    return mean, math.sqrt(max(var, 0.0) / (n - 1))


@dataclass
class TopTokens:
    """Per scored position, the k most likely next tokens of the model and of the base, with
    their probabilities: what --show-worst prints for the positions of largest KLD."""

    model_ids: list[np.ndarray] = field(default_factory=list)  # per chunk [positions, k]
    model_p: list[np.ndarray] = field(default_factory=list)
    base_ids: list[np.ndarray] = field(default_factory=list)
    base_p: list[np.ndarray] = field(default_factory=list)

    def add(self, lp: np.ndarray, blp: np.ndarray, k: int) -> None:
        for src, ids_out, p_out in ((lp, self.model_ids, self.model_p),
                                    (blp, self.base_ids, self.base_p)):  # fmt: skip
            ids = np.argpartition(-src, k, axis=-1)[:, :k]
            order = np.argsort(-np.take_along_axis(src, ids, axis=-1), axis=-1, kind="stable")
            ids = np.take_along_axis(ids, order, axis=-1)
            ids_out.append(ids)
            p_out.append(np.exp(np.take_along_axis(src, ids, axis=-1)))


def _check_vocab(lp: np.ndarray, blp: np.ndarray) -> None:
    if lp.shape[-1] != blp.shape[-1]:
        raise InputError(
            f"the model's vocabulary has {lp.shape[-1]} entries and the base's {blp.shape[-1]}",
            "KL divergence compares the same vocabulary on both sides; pick a base of the same family",
        )


class LogprobStore(Protocol):
    """Where the base's log-probabilities of each chunk are kept: on disk
    (`BaseLogprobCache`) or in memory (distillation's held-out chunks)."""

    def get(self, i: int) -> np.ndarray | None: ...
    def put(self, i: int, lp: np.ndarray) -> None: ...


def evaluate(
    backend: Backend | None,
    chunks: list[np.ndarray],
    ctx: int,
    base: Backend | None = None,
    base_cache: LogprobStore | None = None,
    on_chunk: Callable[[int, float], None] | None = None,
    tops: TopTokens | None = None,
    top_k: int = 3,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Score every chunk. Returns per-token NLL, and with a base: per-token KLD,
    top-1 agreement flags and the base's per-token NLL. A `backend` of None means the model
    is the base itself: its numbers come from the base's log-probabilities (KLD 0)."""
    nll_all, kld_all, agree_all, base_nll_all = [], [], [], []
    first = ctx // 2
    for i, chunk in enumerate(chunks):
        if len(chunk) != ctx:
            raise InputError(f"chunk {i} has {len(chunk)} tokens, not {ctx}")
        targets = np.asarray(chunk[first + 1 : ctx], dtype=np.int64)
        lp = None
        if backend is not None:
            lp = scored_logprobs(backend.logits(chunk), ctx).astype(np.float32)
        if base is not None or base_cache is not None:
            blp16 = base_cache.get(i) if base_cache is not None else None
            if blp16 is None:
                if base is None:
                    raise InputError(
                        "base log-probabilities are not cached and no base model was given"
                    )
                blp16 = scored_logprobs(base.logits(chunk), ctx)
                if base_cache is not None:
                    base_cache.put(i, blp16)
            blp = blp16.astype(np.float32)
            if lp is None:
                lp = blp
            _check_vocab(lp, blp)
            p = np.exp(blp)
            kld = (p * (blp - lp)).sum(axis=-1)
            kld_all.append(kld)
            agree_all.append(blp.argmax(-1) == lp.argmax(-1))
            base_nll_all.append(-blp[np.arange(len(targets)), targets])
            if tops is not None:
                tops.add(lp, blp, top_k)
        if lp is None:
            raise InputError("no model to score: the base itself needs --kld-base")
        nll_all.append(-lp[np.arange(len(targets)), targets])
        if on_chunk:
            running = float(np.exp(np.concatenate(nll_all).mean()))
            on_chunk(i, running)
    nll = np.concatenate(nll_all)
    if kld_all:
        return nll, np.concatenate(kld_all), np.concatenate(agree_all), np.concatenate(base_nll_all)
    return nll, None, None, None


def summarise(
    nll: np.ndarray,
    kld: np.ndarray | None,
    agree: np.ndarray | None,
    base_nll: np.ndarray | None,
    *,
    model: str,
    model_sha256: str,
    backend: str,
    protocol: dict[str, Any],
    base: str | None = None,
    base_sha256: str | None = None,
    base_backend: str | None = None,
    ctx: int = 512,
) -> EvalResult:
    mean, se = _mean_se(nll.astype(np.float64))
    ppl = math.exp(mean)
    per_chunk = nll.reshape(-1, ctx // 2 - 1).mean(axis=1).tolist() if len(nll) else []
    result = EvalResult(
        model=model,
        model_sha256=model_sha256,
        backend=backend,
        perplexity=ppl,
        perplexity_se=ppl * se,
        nll_mean=mean,
        protocol=protocol,
        per_chunk_nll=per_chunk,
    )
    if kld is not None and agree is not None and base_nll is not None:
        k = kld.astype(np.float64)
        kmean, kse = _mean_se(k)
        result.kld = KLDResult(
            mean=kmean,
            mean_se=kse,
            median=float(np.percentile(k, 50)),
            p90=float(np.percentile(k, 90)),
            p99=float(np.percentile(k, 99)),
            max=float(k.max()),
            top1_agreement=float(agree.mean()),
            base=str(base),
            base_sha256=str(base_sha256),
            base_backend=str(base_backend),
        )
        result.base_perplexity = math.exp(float(base_nll.astype(np.float64).mean()))
    return result
