"""`cllm eval` as a function: checkpoint(s) and an EvalConfig in, an EvalResult out."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cllm.core.eval.backends import Backend, make_backend
from cllm.core.eval.data import load_tokens, make_chunks
from cllm.core.eval.perplexity import (
    PROTOCOL_VERSION,
    BaseLogprobCache,
    EvalConfig,
    EvalResult,
    TopTokens,
    evaluate,
    summarise,
)
from cllm.errors import InputError
from cllm.formats.checkpoint import Checkpoint


class _LazyBackend:
    """Loads the base model only if some chunk is missing from the cache."""

    def __init__(
        self, factory: Callable[[], Backend], name: str, on_load: Callable[[], None]
    ) -> None:
        self._factory = factory
        self._backend: Backend | None = None
        self.name = name
        self._on_load = on_load

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        if self._backend is None:
            self._on_load()
            self._backend = self._factory()
        return self._backend.logits(tokens)

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()


def protocol_dict(cfg: EvalConfig, text_sha256: str, n_chunks: int) -> dict[str, Any]:
    return {
        "version": PROTOCOL_VERSION,
        "text": Path(cfg.text).name,
        "text_sha256": text_sha256,
        "ctx": cfg.ctx,
        "chunks": n_chunks,
        "tokens_scored": n_chunks * (cfg.ctx // 2 - 1),
        "scored": "second half of each non-overlapping chunk (positions ctx/2..ctx-1), no BOS added",
    }


def run_eval(
    model: Checkpoint,
    cfg: EvalConfig,
    kld_base: Checkpoint | None = None,
    base_backend: str | None = None,
    use_cache: bool = True,
    allow_nonfinite: bool = False,
    on_stage: Callable[[str], None] | None = None,
    on_chunk: Callable[[int, float], None] | None = None,
    cache_root: Path | None = None,
    is_base: bool = False,
    show_worst: int = 0,
) -> EvalResult:
    """Score `model` under the protocol of `cfg`, with KLD against `kld_base` if given.

    The base's log-probabilities are cached (under `cache_root` if given, which is how one
    `cllm eval BASE CAND...` run shares one base pass even with --no-cache). `is_base` says
    the model is the base itself on the base's backend: its numbers come from that pass.
    """
    stage = on_stage or (lambda _msg: None)
    if show_worst and kld_base is None:
        raise InputError("--show-worst needs a base to compare with", "Add --kld-base BASE")
    stage("tokenizing evaluation text")
    toks = load_tokens(Path(cfg.text), model.tokenizer_dir())
    chunks = make_chunks(toks.ids, cfg.ctx, cfg.chunks)
    protocol = protocol_dict(cfg, toks.text_sha256, len(chunks))
    base_name = base_backend or "torch"
    base_lazy = None
    cache = None
    if kld_base is not None:
        base_toks = load_tokens(Path(cfg.text), kld_base.tokenizer_dir())
        if len(base_toks.ids) != len(toks.ids) or not np.array_equal(base_toks.ids, toks.ids):
            raise InputError(
                "the model and the --kld-base model tokenize the text differently",
                "KL divergence needs the same tokenizer on both sides",
            )
        key = {
            "base_sha256": kld_base.sha256,
            "base_backend": base_name,
            "text_sha256": toks.text_sha256,
            "tokenizer_sha256": base_toks.tokenizer_sha256,
            "ctx": cfg.ctx,
            "protocol": PROTOCOL_VERSION,
        }
        cache = BaseLogprobCache(key, enabled=use_cache or cache_root is not None, root=cache_root)
        base_lazy = _LazyBackend(
            lambda: make_backend(kld_base, base_name, cfg.ctx, cfg.threads, allow_nonfinite),
            base_name,
            lambda: stage(f"loading the base {kld_base.display_name} ({base_name})"),
        )
    backend = None
    if not (is_base and kld_base is not None):
        stage(f"loading {model.display_name} ({cfg.backend})")
        backend = make_backend(model, cfg.backend, cfg.ctx, cfg.threads, allow_nonfinite)
    tops = TopTokens() if show_worst and backend is not None else None
    try:
        stage("scoring")
        nll, kld, agree, base_nll = evaluate(
            backend, chunks, cfg.ctx, base_lazy, cache, on_chunk, tops=tops
        )
    finally:
        if backend is not None:
            backend.close()
        if base_lazy is not None:
            base_lazy.close()
    result = summarise(
        nll,
        kld,
        agree,
        base_nll,
        model=str(model.path),
        model_sha256=model.sha256,
        backend=cfg.backend,
        protocol=protocol,
        base=str(kld_base.path) if kld_base is not None else None,
        base_sha256=kld_base.sha256 if kld_base is not None else None,
        base_backend=base_name if kld_base is not None else None,
        ctx=cfg.ctx,
    )
    if tops is not None and kld is not None:
        from cllm.core.eval.worst import worst_positions
        from cllm.formats.checkpoint import load_tokenizer

        tok = load_tokenizer(model.tokenizer_dir())
        result.worst = worst_positions(kld, tops, chunks, cfg.ctx, tok, show_worst)
    return result
