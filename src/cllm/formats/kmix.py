"""llama.cpp's per-tensor type choices for its K-quant mixes (Q2_K, Q3_K_S/M/L, Q4_K_S/M,
Q5_K_S/M, Q6_K), so that cllm's own K-grid quantizers (GPTQ, AWQ) write the same mix of
types llama.cpp's quantizer would, fallbacks included.

Restated from llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp, as vendored by
llama-cpp-python 0.3.17 and later) for dense models (no experts, not Falcon, not 70B):

- every tensor starts at the mix's default type (Q3_K for the Q3_K mixes, ...);
- `output.weight`, and `token_embd.weight` when the embedding is tied, get Q6_K (Q8_0 if
  its rows do not split into 256-blocks);
- attn_v (and fused attn_qkv) and ffn_down get more bits in some layers, counted in file
  order: `use_more_bits(i, n)` is `i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2`;
- attn_output gets more bits in the Q2_K and Q3_K mixes;
- last, a type whose block does not divide the row length falls back: Q2_K and Q3_K to
  Q4_0, Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0, and to F16 when 32 does not divide it.

A test checks these choices against llama.cpp's on models whose widths trigger each rule.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

K_MIXES = {
    "Q2_K": "Q2_K",
    "Q3_K_S": "Q3_K",
    "Q3_K_M": "Q3_K",
    "Q3_K_L": "Q3_K",
    "Q4_K_S": "Q4_K",
    "Q4_K_M": "Q4_K",
    "Q5_K_S": "Q5_K",
    "Q5_K_M": "Q5_K",
    "Q6_K": "Q6_K",
}
BLOCK = {"Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_LAYER = re.compile(r"blk\.(\d+)\.")


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _sort_key(name: str) -> tuple[int, str]:
    m = _LAYER.match(name)
    return (int(m.group(1)) if m else -1, name)


def _block(t: str) -> int:
    return BLOCK.get(t, 32)


def mix_types(
    ftype: str,
    tensors: Iterable[tuple[str, tuple[int, ...]]],
    n_layers: int,
    n_head: int,
    n_head_kv: int,
) -> dict[str, str]:
    """The type of each quantized tensor (GGUF name -> type) for a K mix. `tensors` are the
    2-D weight tensors with their GGUF shapes (ne[0], the row length, first)."""
    default = K_MIXES[ftype]
    items = sorted(tensors, key=lambda t: _sort_key(t[0]))
    names = {n for n, _ in items}
    tied = "output.weight" not in names
    n_gqa = n_head // n_head_kv if n_head_kv else 0
    n_wv = sum(1 for n, _ in items if _is_attn_v(n))
    i_wv = 0
    i_down = 0
    out: dict[str, str] = {}
    for name, shape in items:
        row = shape[0]
        t = default
        if name == "output.weight" or (name == "token_embd.weight" and tied):
            t = "Q8_0" if row % _block(default) else "Q6_K"
        elif name == "token_embd.weight":
            t = default
        elif _is_attn_v(name):
            t = _attn_v(ftype, default, i_wv, n_wv, n_gqa)
            i_wv += 1
        elif "ffn_down" in name:
            t = _ffn_down(ftype, default, i_down, n_layers)
            i_down += 1
        elif "attn_output.weight" in name:
            t = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(ftype, default)
        out[name] = _fallback(t, row)
    return out


def _is_attn_v(name: str) -> bool:
    return any(k in name for k in ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight"))


def _attn_v(ftype: str, default: str, i: int, n: int, n_gqa: int) -> str:
    if ftype == "Q2_K":
        return "Q4_K" if n_gqa >= 4 else "Q3_K"
    if ftype == "Q3_K_M":
        return "Q5_K" if i < 2 else "Q4_K"
    if ftype == "Q3_K_L":
        return "Q5_K"
    if ftype == "Q4_K_S":
        return "Q5_K" if i < 4 else default
    if ftype in ("Q4_K_M", "Q5_K_M"):
        return "Q6_K" if use_more_bits(i, n) else default
    return default


def _ffn_down(ftype: str, default: str, i: int, n: int) -> str:
    if ftype == "Q2_K":
        return "Q3_K"
    if ftype == "Q3_K_M":
        return "Q5_K" if i < n // 16 else "Q4_K"
    if ftype == "Q3_K_L":
        return "Q5_K"
    if ftype == "Q4_K_S":
        return "Q5_K" if i < n // 8 else default
    if ftype in ("Q4_K_M", "Q5_K_M"):
        return "Q6_K" if use_more_bits(i, n) else default
    return default


def _fallback(t: str, row: int) -> str:
    if row % _block(t) == 0:
        return t
    t = FALLBACK.get(t, t)
    return t if row % 32 == 0 else "F16"
