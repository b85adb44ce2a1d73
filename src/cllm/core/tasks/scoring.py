"""Log-likelihood of continuations, the one operation task evaluation needs from a backend.

A request is scored as `prefix + tail`: the logits at the tail's positions predict its
`target` tokens (the continuation, shifted by one). Requests that share a prefix (the
choices of one multiple-choice question, few-shot examples before each question) are
grouped by the caller, so every backend evaluates a prefix once:

- llama.cpp keeps it in its KV cache and asks for logits only at the tail's positions (the
  prefix's last position included): never `n_ctx x n_vocab` for a whole context;
- onnxruntime keeps the prefix's KV cache (immutable arrays) and runs each tail on it;
- torch runs each group's tails on a copy of the prefix's cache, in one padded batch.

Each function returns, per tail, (sum of log-probabilities of the targets, whether every
target is the argmax), which is what lm-eval's `loglikelihood` wants.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Group = tuple[list[int], list[tuple[list[int], list[int]]]]  # prefix, [(tail, target)]
Score = tuple[float, bool]


def _score_rows(logits: np.ndarray, target: list[int]) -> Score:
    """logits [len(target), vocab] (float32) at the tail positions."""
    x = logits.astype(np.float64, copy=False)
    m = x.max(axis=1, keepdims=True)
    logz = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    idx = np.asarray(target, dtype=np.int64)
    lp = x[np.arange(len(target)), idx] - logz
    greedy = bool(np.all(x.argmax(axis=1) == idx))
    return float(lp.sum()), greedy


# -- llama.cpp -----------------------------------------------------------------------


class LlamaCppScorer:
    """Drives llama-cpp-python's context directly: positions `[0, n_past)` stay in the KV
    cache between calls, so a prefix shared with the previous group is not evaluated again."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.n_vocab = int(llm.n_vocab())
        self.n_batch = int(llm.n_batch)
        self.n_ctx = int(llm.n_ctx())
        self.cached: list[int] = []  # tokens whose K/V are in the cache, in order

    def _decode(self, tokens: list[int], n_past: int, logits_rows: bool) -> np.ndarray | None:
        """Evaluate `tokens` at positions n_past...; the logits of every one of them when
        `logits_rows`, else none kept (llama.cpp still computes the last row)."""
        ctx, batch = self.llm._ctx, self.llm._batch
        ctx.kv_cache_seq_rm(-1, n_past, -1)
        rows = []
        for i in range(0, len(tokens), self.n_batch):
            part = tokens[i : i + self.n_batch]
            batch.set_batch(batch=part, n_past=n_past + i, logits_all=logits_rows)
            ctx.decode(batch)
            if logits_rows:
                out = np.ctypeslib.as_array(ctx.get_logits(), shape=(len(part) * self.n_vocab,))
                rows.append(out.reshape(len(part), self.n_vocab).copy())
        return np.concatenate(rows) if rows else None

    def score(self, groups: list[Group]) -> list[list[Score]]:
        results = []
        for prefix, tails in groups:
            longest = max(len(t) for t, _ in tails) if tails else 0
            if len(prefix) + longest > self.n_ctx:
                raise ValueError(f"request of {len(prefix) + longest} tokens > n_ctx {self.n_ctx}")
            # the prefix: reuse what the cache already holds, evaluate the rest without logits
            keep = 0
            for a, b in zip(self.cached, prefix, strict=False):
                if a != b:
                    break
                keep += 1
            if keep < len(prefix):
                self._decode(prefix[keep:], keep, logits_rows=False)
            self.cached = list(prefix)
            out = []
            for tail, target in tails:
                logits = self._decode(tail, len(prefix), logits_rows=True)
                assert logits is not None
                out.append(_score_rows(logits, target))
            # the cache now holds prefix + the last tail; only the prefix is trusted
            results.append(out)
        return results


# -- onnxruntime ---------------------------------------------------------------------


def onnx_score(decoder: Any, groups: list[Group]) -> list[list[Score]]:
    results = []
    for prefix, tails in groups:
        cache = decoder.empty_cache()
        if prefix:
            _, cache = decoder.run(np.asarray([prefix]), cache)
        out = []
        for tail, target in tails:
            logits, _ = decoder.run(np.asarray([tail]), cache)  # the prefix cache is reused
            out.append(_score_rows(logits[0], target))
        results.append(out)
    return results


# -- torch ---------------------------------------------------------------------------


def torch_score(model: Any, groups: list[Group], batch_size: int = 8) -> list[list[Score]]:
    """Each request as one padded sequence (right padding, attention mask), `batch_size`
    at a time; log-softmax only at the tail positions."""
    import torch

    flat = [(g, j, prefix + tail, len(prefix), target)
            for g, (prefix, tails) in enumerate(groups)
            for j, (tail, target) in enumerate(tails)]  # fmt: skip
    order = sorted(range(len(flat)), key=lambda i: -len(flat[i][2]))  # similar lengths together
    scores: dict[tuple[int, int], Score] = {}
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            items = [flat[i] for i in order[start : start + batch_size]]
            width = max(len(it[2]) for it in items)
            ids = torch.zeros((len(items), width), dtype=torch.long)
            mask = torch.zeros((len(items), width), dtype=torch.long)
            for r, it in enumerate(items):
                ids[r, : len(it[2])] = torch.as_tensor(it[2])
                mask[r, : len(it[2])] = 1
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            for r, (g, j, seq, n_prefix, target) in enumerate(items):
                rows = logits[r, n_prefix : len(seq)].float().numpy()
                scores[(g, j)] = _score_rows(rows, target)
    return [[scores[(g, j)] for j in range(len(tails))] for g, (_, tails) in enumerate(groups)]


def greedy_tokens(next_logits: Any, prompt: list[int], max_new: int, stop: set[int]) -> list[int]:
    """Greedy decoding for `generate_until`, given a function that feeds new tokens and
    returns the logits of the last one (backends keep their own caches)."""
    out: list[int] = []
    logits = next_logits(prompt, reset=True)
    for _ in range(max_new):
        tok = int(np.argmax(logits))
        if tok in stop:
            break
        out.append(tok)
        logits = next_logits([tok], reset=False)
    return out
