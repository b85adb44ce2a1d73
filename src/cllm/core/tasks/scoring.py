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
    """Drives llama.cpp through its own context: many sequences over one unified KV cache,
    and several groups in each `llama_decode`. A group's prefix tokens belong to the
    sequences of all its tails (llama.cpp lets a token carry several sequence ids), each
    tail to its own, so the prefix is evaluated once and every tail attends to it; logits
    are asked for only at the tails' positions. A weight-bound model thus pays one pass over
    its weights per batch of up to `n_batch` tokens, not one per question or per choice."""

    MAX_SEQ = 64

    def __init__(self, llm: Any, n_ctx: int, n_batch: int) -> None:
        import llama_cpp
        from llama_cpp import _internals

        self.llm = llm
        params = llama_cpp.llama_context_default_params()
        for name, *_ in type(params)._fields_:  # the loaded model's settings (threads, ...)
            setattr(params, name, getattr(llm.context_params, name))
        params.n_ctx = max(n_ctx, n_batch)
        params.n_batch = params.n_ubatch = n_batch
        # llama.cpp reserves an output row per sequence within a batch: no more sequences
        # than batch slots
        self.max_seq = min(self.MAX_SEQ, n_batch)
        params.n_seq_max = self.max_seq
        params.kv_unified = True
        self.ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
        self.batch = _internals.LlamaBatch(
            n_tokens=n_batch, embd=0, n_seq_max=self.max_seq, verbose=False
        )
        self.n_vocab = int(llm.n_vocab())
        self.n_batch = n_batch
        self.n_ctx = n_ctx

    def _run(self, items: list[tuple[int, int, list[int], bool]]) -> np.ndarray:
        """One `llama_decode` of (token, position, sequence ids, wants logits); the logit
        rows asked for, in order."""
        b = self.batch.batch
        b.n_tokens = len(items)
        for i, (tok, pos, seqs, want) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, len(seqs), want
            for k, sq in enumerate(seqs):
                b.seq_id[i][k] = sq
        self.ctx.decode(self.batch)
        rows = sum(1 for it in items if it[3])
        if not rows:
            return np.zeros((0, self.n_vocab), np.float32)
        out = np.ctypeslib.as_array(self.ctx.get_logits(), shape=(rows * self.n_vocab,))
        return out.reshape(rows, self.n_vocab).copy()

    def _size(self, group: Group) -> tuple[int, int]:
        prefix, tails = group
        return len(prefix) + sum(len(t) for t, _ in tails), len(tails)

    def score(self, groups: list[Group]) -> list[list[Score]]:
        results: list[list[Score]] = []
        i = 0
        while i < len(groups):
            tokens, seqs = self._size(groups[i])
            if tokens > self.n_batch or seqs > self.max_seq:
                results.append(self._alone(groups[i]))
                i += 1
                continue
            pack = [groups[i]]
            while i + len(pack) < len(groups):
                t, q = self._size(groups[i + len(pack)])
                if tokens + t > self.n_batch or seqs + q > self.max_seq:
                    break
                pack.append(groups[i + len(pack)])
                tokens, seqs = tokens + t, seqs + q
            results += self._pack(pack)
            i += len(pack)
        return results

    def _pack(self, pack: list[Group]) -> list[list[Score]]:
        self.ctx.kv_cache_clear()
        items: list[tuple[int, int, list[int], bool]] = []
        seq = 0
        for prefix, tails in pack:
            ids = list(range(seq, seq + len(tails)))
            seq += len(tails)
            items += [(tok, p, ids, False) for p, tok in enumerate(prefix)]
            for sq, (tail, _target) in zip(ids, tails, strict=True):
                items += [(tok, len(prefix) + p, [sq], True) for p, tok in enumerate(tail)]
        logits = self._run(items)
        out, at = [], 0
        for _prefix, tails in pack:
            row = []
            for tail, target in tails:
                row.append(_score_rows(logits[at : at + len(tail)], target))
                at += len(tail)
            out.append(row)
        return out

    def _alone(self, group: Group) -> list[Score]:
        """A group larger than one batch: its prefix in parts, then each tail in parts."""
        prefix, tails = group
        if len(prefix) + max((len(t) for t, _ in tails), default=0) > self.n_ctx:
            raise ValueError(f"a request longer than the context ({self.n_ctx} tokens)")
        self.ctx.kv_cache_clear()
        for s in range(0, len(prefix), self.n_batch):
            part = prefix[s : s + self.n_batch]
            self._run([(tok, s + p, [0], False) for p, tok in enumerate(part)])
        out = []
        for tail, target in tails:
            self.ctx.kv_cache_seq_rm(0, len(prefix), -1)
            rows = []
            for s in range(0, len(tail), self.n_batch):
                part = tail[s : s + self.n_batch]
                start = len(prefix) + s
                rows.append(self._run([(tok, start + p, [0], True) for p, tok in enumerate(part)]))
            out.append(_score_rows(np.concatenate(rows), target))
        return out

    def next_logits(self, tokens: list[int], n_past: int) -> np.ndarray:
        """Greedy generation on sequence 0: `tokens` at n_past...; the last one's logits."""
        if n_past == 0:
            self.ctx.kv_cache_clear()
        last = np.zeros(0)
        for s in range(0, len(tokens), self.n_batch):
            part = tokens[s : s + self.n_batch]
            flags = [(tok, n_past + s + p, [0], p == len(part) - 1) for p, tok in enumerate(part)]
            last = self._run(flags)[-1]
        return last

    def close(self) -> None:
        self.batch.close()
        self.ctx.close()


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
