"""Hyperparameters between a transformers config and llama.cpp's GGUF keys, per family.

transformers 5 keeps RoPE settings in `rope_parameters` (nested per attention type for
Gemma 3), older configs keep `rope_theta` / `rope_scaling` at the top; everything here
reads them through `rope_parameters()` so both spellings give the same GGUF. Each
family's writer refuses settings llama.cpp would run differently from transformers
(a silently different model is worse than an error), and each reader builds the config
transformers needs to run what llama.cpp runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from cllm.errors import InputError, UsageError

FULL = "full_attention"
SLIDING = "sliding_attention"

# the RoPE variants llama.cpp implements, as transformers names them
ROPE_TYPES = ("default", "linear", "yarn", "llama3", "longrope")


def head_dim(config: dict[str, Any]) -> int:
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    return int(config.get("head_dim") or hidden // heads)


def rope_parameters(config: dict[str, Any], layer_type: str = FULL) -> dict[str, Any]:
    """One attention type's RoPE settings, whichever way the config spells them."""
    rp = config.get("rope_parameters")
    out: dict[str, Any] = {}
    if isinstance(rp, dict) and isinstance(rp.get(layer_type), dict):
        out = dict(rp[layer_type])
    elif isinstance(rp, dict) and not any(isinstance(v, dict) for v in rp.values()):
        out = dict(rp)
    legacy = config.get("rope_scaling")
    if isinstance(legacy, dict) and layer_type == FULL:
        out = {**legacy, **out}
    if "type" in out and "rope_type" not in out:
        out["rope_type"] = out.pop("type")
    out.setdefault("rope_type", "default")
    if out["rope_type"] == "su":
        out["rope_type"] = "longrope"
    if "rope_theta" not in out:
        if layer_type == SLIDING:
            out["rope_theta"] = float(config.get("rope_local_base_freq", 10000.0))
        else:
            out["rope_theta"] = float(config.get("rope_theta", 10000.0))
    return out


def _rope_type(config: dict[str, Any], allowed: tuple[str, ...]) -> dict[str, Any]:
    rp = rope_parameters(config)
    if rp["rope_type"] not in allowed:
        raise UsageError(
            f"RoPE type '{rp['rope_type']}' of this {config.get('model_type')} model cannot be written to GGUF",
            "llama.cpp runs these RoPE types for it: " + ", ".join(allowed),
        )
    return rp


# -- writing -----------------------------------------------------------------------


def _write_sizes(w: Any, config: dict[str, Any]) -> None:
    heads = int(config["num_attention_heads"])
    w.add_context_length(int(config.get("max_position_embeddings", 2048)))
    w.add_embedding_length(int(config["hidden_size"]))
    w.add_block_count(int(config["num_hidden_layers"]))
    w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_head_count(heads)
    w.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))


def _write_common(w: Any, config: dict[str, Any], explicit_head_dim: bool) -> dict[str, Any]:
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    hd = head_dim(config)
    _write_sizes(w, config)
    if explicit_head_dim or hd != hidden // heads:
        w.add_key_length(hd)
        w.add_value_length(hd)
    rp = rope_parameters(config)
    w.add_rope_freq_base(float(rp["rope_theta"]))
    kind = rp["rope_type"]
    if kind == "linear":
        w.add_rope_scaling_type(_scaling("LINEAR"))
        w.add_rope_scaling_factor(float(rp["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(_scaling("YARN"))
        w.add_rope_scaling_factor(float(rp["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rp["original_max_position_embeddings"]))
        for key, add in (
            ("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
            ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
            ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
            ("beta_slow", w.add_rope_scaling_yarn_beta_slow),
        ):
            if rp.get(key) is not None:
                add(float(rp[key]))
    return rp


def _scaling(name: str) -> Any:
    from gguf import RopeScalingType

    return RopeScalingType[name]


def write_llama(w: Any, config: dict[str, Any]) -> dict[str, np.ndarray]:
    _rope_type(config, ("default", "linear", "yarn", "llama3"))
    rp = _write_common(w, config, explicit_head_dim=False)
    w.add_vocab_size(int(config["vocab_size"]))
    w.add_rope_dimension_count(head_dim(config))
    if rp["rope_type"] == "llama3":
        return {"rope_freqs.weight": llama3_rope_factors(rp, head_dim(config))}
    return {}


def write_qwen(w: Any, config: dict[str, Any]) -> dict[str, np.ndarray]:
    _rope_type(config, ("default", "linear", "yarn"))
    _write_common(w, config, explicit_head_dim=config.get("model_type") == "qwen3")
    return {}


# llama.cpp's Gemma 3 graph fixes what transformers reads from the config: one full
# attention layer in six, local RoPE base 10000, attention scale 1/sqrt(head_dim)
# (1/sqrt(hidden/heads) for the 62-layer 27B). A config that differs would run as a
# different model in llama.cpp, so it is refused rather than written.
GEMMA3_SWA_PATTERN = 6
GEMMA3_LOCAL_BASE = 10000.0


def gemma3_layer_types(n_layers: int) -> list[str]:
    return [FULL if (i + 1) % GEMMA3_SWA_PATTERN == 0 else SLIDING for i in range(n_layers)]


def gemma3_query_scalar(config: dict[str, Any]) -> int:
    n_layers = int(config["num_hidden_layers"])
    if n_layers == 62:
        return int(config["hidden_size"]) // int(config["num_attention_heads"])
    return head_dim(config)


def write_gemma3(w: Any, config: dict[str, Any]) -> dict[str, np.ndarray]:
    _rope_type(config, ("default", "linear"))
    n_layers = int(config["num_hidden_layers"])
    types = config.get("layer_types") or gemma3_layer_types(n_layers)
    problems = []
    if list(types) != gemma3_layer_types(n_layers):
        problems.append("its layer_types are not one full-attention layer in six")
    local = rope_parameters(config, SLIDING)
    if float(local["rope_theta"]) != GEMMA3_LOCAL_BASE or local["rope_type"] != "default":
        problems.append(f"its local RoPE is not plain with base {GEMMA3_LOCAL_BASE:g}")
    scalar = config.get("query_pre_attn_scalar")
    if scalar is not None and float(scalar) != gemma3_query_scalar(config):
        problems.append(
            f"query_pre_attn_scalar is {scalar}, llama.cpp uses {gemma3_query_scalar(config):g}"
        )
    if config.get("attn_logit_softcapping") is not None:
        problems.append("it soft-caps attention logits")
    if problems:
        raise UsageError(
            "this Gemma 3 model would run differently in llama.cpp: " + "; ".join(problems),
            "llama.cpp fixes these for the gemma3 architecture; keep them as Gemma 3 ships them",
        )
    _write_common(w, config, explicit_head_dim=True)
    w.add_rope_freq_base_swa(GEMMA3_LOCAL_BASE)
    if config.get("sliding_window"):
        w.add_sliding_window(int(config["sliding_window"]))
    if config.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    return {}


def phi3_rope_dims(config: dict[str, Any]) -> int:
    rp = rope_parameters(config)
    partial = float(rp.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
    return int(partial * int(config["hidden_size"])) // int(config["num_attention_heads"])


def write_phi3(w: Any, config: dict[str, Any]) -> dict[str, np.ndarray]:
    rp = _rope_type(config, ("default", "longrope"))
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    if head_dim(config) != hidden // heads:
        raise UsageError("this Phi-3 model's head_dim is not hidden_size / num_attention_heads",
                         "llama.cpp's phi3 architecture derives it that way")  # fmt: skip
    max_pos = int(config.get("max_position_embeddings", 4096))
    orig = int(
        rp.get("original_max_position_embeddings")
        or config.get("original_max_position_embeddings")
        or max_pos
    )
    _write_sizes(w, config)
    w.add_rope_scaling_orig_ctx_len(orig)
    dims = phi3_rope_dims(config)
    w.add_rope_dimension_count(dims)
    w.add_rope_freq_base(float(rp["rope_theta"]))
    w.add_sliding_window(int(config.get("sliding_window") or 0))
    if rp["rope_type"] != "longrope":
        return {}
    long_f = np.asarray(rp["long_factor"], dtype=np.float32)
    short_f = np.asarray(rp["short_factor"], dtype=np.float32)
    if long_f.shape != (dims // 2,) or short_f.shape != (dims // 2,):
        raise InputError(f"Phi-3 LongRoPE factors must have {dims // 2} entries each")
    scale = max_pos / orig
    attn = 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(orig))
    w.add_rope_scaling_attn_factors(float(rp.get("attention_factor") or attn))
    return {"rope_factors_long.weight": long_f, "rope_factors_short.weight": short_f}


def llama3_rope_factors(rp: dict[str, Any], dim: int) -> np.ndarray:
    """The per-frequency divisors llama.cpp applies for Llama 3.1+ RoPE scaling (the same
    rescaling transformers' `llama3` RoPE type applies to its inverse frequencies)."""
    base = float(rp["rope_theta"])
    factor = float(rp["factor"])
    low = float(rp.get("low_freq_factor", 1.0))
    high = float(rp.get("high_freq_factor", 4.0))
    orig = float(rp.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * math.pi / freqs
    smooth = (orig / wavelen - low) / (high - low)
    out = np.where(
        wavelen < orig / high,
        1.0,
        np.where(wavelen > orig / low, factor, 1.0 / ((1 - smooth) / factor + smooth)),
    )
    return out.astype(np.float32)


# -- reading -----------------------------------------------------------------------

KV = Callable[[str, Any], Any]
Extra = Callable[[str], "np.ndarray | None"]  # a GGUF tensor outside the layers, as float32


def _read_common(kv: KV, arch: str, n_vocab: int) -> dict[str, Any]:
    hidden = int(kv(f"{arch}.embedding_length", 0))
    heads = int(kv(f"{arch}.attention.head_count", 0))
    if not hidden or not heads:
        raise InputError("GGUF file lacks embedding_length or attention.head_count")
    hd = int(kv(f"{arch}.attention.key_length", 0) or hidden // heads)
    rp: dict[str, Any] = {
        "rope_type": "default",
        "rope_theta": float(kv(f"{arch}.rope.freq_base", 10000.0)),
    }
    scaling = str(kv(f"{arch}.rope.scaling.type", "none"))
    if scaling == "linear":
        rp.update(rope_type="linear", factor=float(kv(f"{arch}.rope.scaling.factor", 1.0)))
    elif scaling == "yarn":
        rp.update(
            rope_type="yarn",
            factor=float(kv(f"{arch}.rope.scaling.factor", 1.0)),
            original_max_position_embeddings=int(
                kv(f"{arch}.rope.scaling.original_context_length", 0)
            ),
        )
        for key, name in (
            ("extrapolation_factor", "rope.scaling.yarn_ext_factor"),
            ("attention_factor", "rope.scaling.yarn_attn_factor"),
            ("beta_fast", "rope.scaling.yarn_beta_fast"),
            ("beta_slow", "rope.scaling.yarn_beta_slow"),
        ):
            value = kv(f"{arch}.{name}", None)
            if value is not None:
                rp[key] = float(value)
    elif scaling not in ("none", "longrope"):
        raise InputError(f"GGUF RoPE scaling '{scaling}' is not supported")
    return {
        "hidden_size": hidden,
        "intermediate_size": int(kv(f"{arch}.feed_forward_length", 0)),
        "num_hidden_layers": int(kv(f"{arch}.block_count", 0)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": hd,
        "max_position_embeddings": int(kv(f"{arch}.context_length", 2048)),
        "rms_norm_eps": float(kv(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_parameters": rp,
        "vocab_size": int(kv(f"{arch}.vocab_size", n_vocab) or n_vocab),
        "bos_token_id": kv("tokenizer.ggml.bos_token_id", None),
        "eos_token_id": kv("tokenizer.ggml.eos_token_id", None),
        "pad_token_id": kv("tokenizer.ggml.padding_token_id", None),
    }


def read_llama(kv: KV, arch: str, n_vocab: int, extra: Extra, has: set[str]) -> dict[str, Any]:
    cfg = _read_common(kv, arch, n_vocab)
    cfg.update(hidden_act="silu", attention_bias="self_attn.q_proj.bias" in has, mlp_bias=False)
    freqs = extra("rope_freqs.weight")
    if freqs is not None:
        cfg["rope_parameters"] = _fit_llama3(cfg["rope_parameters"], freqs, cfg["head_dim"])
    return cfg


# Llama 3.1 (factor 8) and 3.2 (factor 32) with their published low/high factors and
# 8192-token original context; a GGUF stores only the resulting divisors.
_LLAMA3_CANDIDATES = [
    {"factor": f, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192}
    for f in (8.0, 16.0, 32.0, 64.0)
]  # fmt: skip


def _fit_llama3(rp: dict[str, Any], freqs: np.ndarray, dim: int) -> dict[str, Any]:
    for cand in _LLAMA3_CANDIDATES:
        trial = {**rp, "rope_type": "llama3", **cand}
        want = llama3_rope_factors(trial, dim)
        if want.shape == freqs.shape and np.allclose(want, freqs, rtol=1e-4):
            return trial
    raise InputError(
        "this GGUF's rope_freqs tensor matches no known Llama 3 RoPE scaling",
        "cllm reads Llama 3.1/3.2-style scaling (low 1, high 4, original context 8192)",
    )


def read_qwen2(kv: KV, arch: str, n_vocab: int, extra: Extra, has: set[str]) -> dict[str, Any]:
    cfg = _read_common(kv, arch, n_vocab)
    cfg.update(hidden_act="silu", use_sliding_window=False)
    return cfg


def read_qwen3(kv: KV, arch: str, n_vocab: int, extra: Extra, has: set[str]) -> dict[str, Any]:
    cfg = read_qwen2(kv, arch, n_vocab, extra, has)
    cfg["attention_bias"] = "self_attn.q_proj.bias" in has
    return cfg


def read_gemma3(kv: KV, arch: str, n_vocab: int, extra: Extra, has: set[str]) -> dict[str, Any]:
    cfg = _read_common(kv, arch, n_vocab)
    n_layers = int(cfg["num_hidden_layers"])
    cfg["rope_parameters"] = {
        FULL: cfg["rope_parameters"],
        SLIDING: {"rope_type": "default", "rope_theta": GEMMA3_LOCAL_BASE},
    }
    window = int(kv(f"{arch}.attention.sliding_window", 0) or 0)
    cfg.update(
        hidden_activation="gelu_pytorch_tanh",
        layer_types=gemma3_layer_types(n_layers),
        sliding_window=window or None,
        final_logit_softcapping=kv(f"{arch}.final_logit_softcapping", None),
        attn_logit_softcapping=None,
        attention_bias=False,
    )
    cfg["query_pre_attn_scalar"] = gemma3_query_scalar(cfg)
    return cfg


def read_phi3(kv: KV, arch: str, n_vocab: int, extra: Extra, has: set[str]) -> dict[str, Any]:
    cfg = _read_common(kv, arch, n_vocab)
    hd = int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])
    cfg["head_dim"] = hd
    dims = int(kv(f"{arch}.rope.dimension_count", hd))
    orig = int(kv(f"{arch}.rope.scaling.original_context_length", cfg["max_position_embeddings"]))
    rp: dict[str, Any] = {
        "rope_type": "default",
        "rope_theta": cfg["rope_parameters"]["rope_theta"],
        "partial_rotary_factor": dims / hd,
    }
    long_f, short_f = extra("rope_factors_long.weight"), extra("rope_factors_short.weight")
    if long_f is not None and short_f is not None:
        rp.update(
            rope_type="longrope",
            long_factor=[float(x) for x in long_f],
            short_factor=[float(x) for x in short_f],
            original_max_position_embeddings=orig,
        )
        attn = kv(f"{arch}.rope.scaling.attn_factor", None)
        if attn is not None:
            rp["attention_factor"] = float(attn)
    cfg.update(
        rope_parameters=rp,
        original_max_position_embeddings=orig,
        sliding_window=None,  # llama.cpp runs phi3 without a sliding window, whatever the key says
        hidden_act="silu",
    )
    return cfg
