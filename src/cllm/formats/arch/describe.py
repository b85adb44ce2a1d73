"""What `cllm info` says about a model's architecture: its family and the features that set
this particular model apart from a plain Llama.

Features are read from the model's own config (and the family's tensor table), not from a
fixed list per family: a Qwen2 with tied embeddings, a Llama 3.2 with RoPE scaling and a
Llama 2 without it all say what they are. The same config comes from an HF folder and from
a GGUF (its reader rebuilds one), so both formats describe a model the same way.
"""

from __future__ import annotations

from typing import Any

from cllm.formats.arch.hparams import FULL, SLIDING, head_dim, rope_parameters
from cllm.formats.arch.spec import ArchSpec


def _rope(config: dict[str, Any]) -> str:
    rp = rope_parameters(config, FULL)
    kind = rp["rope_type"]
    base = f"base {float(rp['rope_theta']):,.0f}"
    if kind == "default":
        text = f"RoPE {base}"
    elif kind == "llama3":
        text = f"RoPE {base}, Llama 3 scaling x{float(rp.get('factor', 1.0)):g}"
    elif kind == "longrope":
        text = f"RoPE {base}, LongRoPE"
    else:
        text = f"RoPE {base}, {kind} scaling x{float(rp.get('factor', 1.0)):g}"
    partial = rp.get("partial_rotary_factor", config.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        text += f", on {float(partial):.0%} of each head"
    return text


def _attention(config: dict[str, Any]) -> str:
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    if kv == heads:
        kind = "multi-head attention"
    elif kv == 1:
        kind = "multi-query attention"
    else:
        kind = f"grouped-query attention ({heads // kv} query heads per KV head)"
    dim = head_dim(config)
    if dim * heads != int(config["hidden_size"]):
        kind += f", head_dim {dim}"
    return kind


def _windows(config: dict[str, Any]) -> str | None:
    window = config.get("sliding_window")
    if not window:
        return None
    types = config.get("layer_types") or []
    n = int(config["num_hidden_layers"])
    local = sum(t == SLIDING for t in types) if types else n
    if local == 0:
        return None
    if local == n:
        return f"sliding-window attention ({window} tokens)"
    return f"sliding-window attention ({window} tokens) in {local} of {n} layers, full in the rest"


def features(spec: ArchSpec, config: dict[str, Any]) -> list[str]:
    """Short phrases, most telling first."""
    out = [_attention(config)]
    suffixes = set(spec.tensors)
    if "self_attn.qkv_proj.weight" in suffixes:
        out.append("fused qkv_proj and gate_up_proj")
    # Qwen2 always has them (its config has no switch); Llama and Qwen3 say so in the config
    if config.get(
        "attention_bias", "attention_bias" not in config and "self_attn.q_proj.bias" in suffixes
    ):
        out.append("q/k/v biases")
    if "self_attn.q_norm.weight" in suffixes:
        out.append("QK-norm")
    if "pre_feedforward_layernorm.weight" in suffixes:
        out.append("sandwich norms")
    if spec.norm_offset:
        out.append(f"RMSNorm computes ({spec.norm_offset:g} + w)")
    if spec.embed_scale:
        out.append("embeddings scaled by sqrt(hidden_size)")
    window = _windows(config)
    if window:
        out.append(window)
    out.append(_rope(config))
    cap = config.get("final_logit_softcapping")
    if cap:
        out.append(f"final logit soft-capping at {float(cap):g}")
    if config.get("tie_word_embeddings"):
        out.append("tied input/output embeddings")
    act = config.get("hidden_activation") or config.get("hidden_act")
    if act and act != "silu":
        out.append(f"{act} gated MLP")
    return out
