"""`--show-worst N`: the scored positions where a compressed model departs most from its base.

A mean KLD says how much worse; the worst positions say where, in words: the text leading to
the position, the token that really came next, and what each model put first. That is
usually enough to tell a broken tokenizer or a damaged layer (nonsense everywhere) from
ordinary quantization noise (near-ties between plausible words).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cllm.core.eval.perplexity import TopTokens

CONTEXT_TOKENS = 16  # decoded tokens shown before each position


def worst_positions(
    kld: np.ndarray,
    tops: TopTokens,
    chunks: list[np.ndarray],
    ctx: int,
    tokenizer: Any,
    n: int,
) -> list[dict[str, Any]]:
    per_chunk = ctx // 2 - 1
    first = ctx // 2
    model_ids, model_p = np.concatenate(tops.model_ids), np.concatenate(tops.model_p)
    base_ids, base_p = np.concatenate(tops.base_ids), np.concatenate(tops.base_p)
    order = np.argsort(-kld, kind="stable")[:n]

    def tok(i: int) -> str:
        return str(tokenizer.decode([int(i)]))

    out = []
    for rank, j in enumerate(order, 1):
        c, off = divmod(int(j), per_chunk)
        at = first + off  # the logits at this position predict token at + 1
        chunk = chunks[c]
        out.append(
            {
                "rank": rank,
                "chunk": c,
                "position": at + 1,
                "kld": float(kld[j]),
                "context": str(
                    tokenizer.decode(
                        [int(t) for t in chunk[max(0, at + 1 - CONTEXT_TOKENS) : at + 1]]
                    )
                ),
                "next": tok(chunk[at + 1]),
                "base_top": [
                    {"token": tok(i), "p": float(p)}
                    for i, p in zip(base_ids[j], base_p[j], strict=True)
                ],
                "model_top": [
                    {"token": tok(i), "p": float(p)}
                    for i, p in zip(model_ids[j], model_p[j], strict=True)
                ],
            }
        )
    return out
