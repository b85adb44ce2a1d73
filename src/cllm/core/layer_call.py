"""How a transformers decoder layer is called outside its model.

GPTQ, AWQ, pruning and sensitivity maps run one decoder layer at a time, so they must
give it what the model's own forward would: RoPE cos/sin (one pair per attention type
for Gemma 3), a sliding-window mask where a layer attends locally and the sequence is
longer than its window (with no mask, sdpa is plainly causal), the embedding scale, and
the final soft-capping of the logits. The family differences come from `ArchSpec` and
the transformers config; this module only applies them.
"""

from __future__ import annotations

from typing import Any

import torch

from cllm.formats.arch import ArchSpec


class LayerCall:
    def __init__(self, config: Any, rotary: torch.nn.Module, spec: ArchSpec) -> None:
        self.config = config
        self.rotary = rotary
        self.spec = spec
        self.types: list[str] | None = getattr(config, "layer_types", None)
        self._cache: dict[tuple[str, int | None, int], dict[str, Any]] = {}

    def layer_type(self, i: int) -> str:
        return self.types[i] if self.types else "full_attention"

    def window(self, i: int) -> int | None:
        w = getattr(self.config, "sliding_window", None)
        if not w or (self.types is not None and self.types[i] != "sliding_attention"):
            return None
        return int(w)

    def kwargs(self, i: int, hidden: torch.Tensor) -> dict[str, Any]:
        """Keyword arguments for decoder layer i on `hidden` ([batch, seq, hidden])."""
        seq = int(hidden.shape[1])
        kind, window = self.layer_type(i), self.window(i)
        key = (kind, window if window and seq > window else None, seq)
        if key not in self._cache:
            pos = torch.arange(seq)[None]
            x = hidden[:1]
            pe = (
                self.rotary(x, pos, kind)
                if self.spec.rotary_per_layer_type
                else self.rotary(x, pos)
            )
            mask = None
            if key[1] is not None:
                q = torch.arange(seq)[:, None]
                k = torch.arange(seq)[None, :]
                mask = ((k <= q) & (q - k < key[1]))[None, None]  # True: may attend
            self._cache[key] = {
                "attention_mask": mask,
                "position_ids": pos,
                "position_embeddings": pe,
            }
        return self._cache[key]


def embed_scale(spec: ArchSpec, config: Any) -> float | None:
    return float(config.hidden_size) ** 0.5 if spec.embed_scale else None


def head_logits(model: Any, x: torch.Tensor) -> torch.Tensor:
    """The model's final norm, LM head and logit soft-capping on the last layer's output."""
    logits = model.lm_head(model.model.norm(x))
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits
