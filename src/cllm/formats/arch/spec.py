"""`ArchSpec`: everything cllm knows about one decoder-only model family.

Tensor names on the GGUF side come from gguf-py's own tables (`gguf.get_tensor_name_map`),
so they are llama.cpp's by construction; the transformers side is a table of per-layer
tensors with symbolic shapes, which a test checks against transformers' own model class
for every family. Reading a GGUF therefore needs neither torch nor transformers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from cllm.errors import InputError
from cllm.formats.arch.hparams import head_dim
from cllm.formats.arch.structure import Structure

LAYER_PREFIX = "model.layers."
GLOBAL_TENSORS: dict[str, tuple[str, ...]] = {
    "model.embed_tokens.weight": ("vocab", "hidden"),
    "model.norm.weight": ("hidden",),
    "lm_head.weight": ("vocab", "hidden"),
}

# the Llama block, shared by most families: symbolic shape per tensor under a layer
_ATTN = {
    "self_attn.q_proj.weight": ("q", "hidden"),
    "self_attn.k_proj.weight": ("kv", "hidden"),
    "self_attn.v_proj.weight": ("kv", "hidden"),
    "self_attn.o_proj.weight": ("hidden", "q"),
}
_ATTN_BIAS = {
    "self_attn.q_proj.bias": ("q",),
    "self_attn.k_proj.bias": ("kv",),
    "self_attn.v_proj.bias": ("kv",),
}
_MLP = {
    "mlp.gate_proj.weight": ("ffn", "hidden"),
    "mlp.up_proj.weight": ("ffn", "hidden"),
    "mlp.down_proj.weight": ("hidden", "ffn"),
}
_NORMS = {"input_layernorm.weight": ("hidden",), "post_attention_layernorm.weight": ("hidden",)}
_QK_NORM = {"self_attn.q_norm.weight": ("head_dim",), "self_attn.k_norm.weight": ("head_dim",)}

LLAMA_TENSORS = {
    **_NORMS, **_ATTN, **_ATTN_BIAS, "self_attn.o_proj.bias": ("hidden",), **_MLP,
    "mlp.gate_proj.bias": ("ffn",), "mlp.up_proj.bias": ("ffn",), "mlp.down_proj.bias": ("hidden",),
}  # fmt: skip
QWEN2_TENSORS = {**_NORMS, **_ATTN, **_ATTN_BIAS, **_MLP}
QWEN3_TENSORS = {**_NORMS, **_ATTN, **_ATTN_BIAS, **_QK_NORM, **_MLP}
GEMMA3_TENSORS = {
    **_NORMS, **_ATTN, **_QK_NORM, **_MLP,
    "pre_feedforward_layernorm.weight": ("hidden",),
    "post_feedforward_layernorm.weight": ("hidden",),
}  # fmt: skip
PHI3_TENSORS = {
    **_NORMS,
    "self_attn.qkv_proj.weight": ("qkv", "hidden"),
    "self_attn.o_proj.weight": ("hidden", "q"),
    "mlp.gate_up_proj.weight": ("ffn2", "hidden"),
    "mlp.down_proj.weight": ("hidden", "ffn"),
}


@dataclass(frozen=True)
class AwqGroup:
    """Linears reading one input, and the module producing it (where AWQ folds 1/s)."""

    producer: str  # module name within the layer
    # "norm": scale its weight; "rows": scale the output rows of a Linear; "none": no
    # scale can be folded (the consumer is only quantized, with its input statistics)
    kind: str
    consumers: tuple[str, ...]


LLAMA_AWQ = (
    AwqGroup("input_layernorm", "norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    AwqGroup("self_attn.v_proj", "rows", ("self_attn.o_proj",)),
    AwqGroup("post_attention_layernorm", "norm", ("mlp.gate_proj", "mlp.up_proj")),
    AwqGroup("mlp.up_proj", "rows", ("mlp.down_proj",)),
)  # fmt: skip
GEMMA3_AWQ = (
    LLAMA_AWQ[0],
    LLAMA_AWQ[1],
    AwqGroup("pre_feedforward_layernorm", "norm", ("mlp.gate_proj", "mlp.up_proj")),
    LLAMA_AWQ[3],
)
# Phi-3's v and up projections are slices of fused Linears, so only the norm groups fold
PHI3_AWQ = (
    AwqGroup("input_layernorm", "norm", ("self_attn.qkv_proj",)),
    AwqGroup("self_attn.o_proj", "none", ("self_attn.o_proj",)),
    AwqGroup("post_attention_layernorm", "norm", ("mlp.gate_up_proj",)),
    AwqGroup("mlp.down_proj", "none", ("mlp.down_proj",)),
)


@dataclass(frozen=True, eq=False)  # identity hash: specs are singletons and cache keys
class ArchSpec:
    model_type: str  # transformers' model_type
    hf_architecture: str  # transformers' class
    gguf_arch: str  # llama.cpp's architecture name (gguf.MODEL_ARCH_NAMES)
    label: str  # what users call it
    tensors: dict[str, tuple[str, ...]]  # per-layer tensor suffix -> symbolic shape
    write_hparams: Callable[[Any, dict[str, Any]], dict[str, np.ndarray]]
    read_hparams: Callable[..., dict[str, Any]]
    features: tuple[str, ...] = ()
    permute_qk: bool = False  # llama.cpp's `llama` graph wants q/k rows in interleaved order
    norm_offset: float = 0.0  # GGUF stores RMSNorm weights as (1 + w) for Gemma
    embed_scale: bool = False  # embeddings are multiplied by sqrt(hidden_size) in the model
    rotary_per_layer_type: bool = False  # the rotary module takes the layer type (Gemma 3)
    extra_gguf: tuple[str, ...] = ()  # GGUF tensors outside the layers that hold hyperparameters
    awq_groups: tuple[AwqGroup, ...] = LLAMA_AWQ
    structure: Structure | None = None  # None: width pruning not supported
    no_structure_reason: str = ""
    onnx_export: bool = True  # onnxruntime-genai's builder knows the family

    # -- names ---------------------------------------------------------------------
    def is_known(self, hf_name: str) -> bool:
        if hf_name in GLOBAL_TENSORS:
            return True
        m = re.fullmatch(re.escape(LAYER_PREFIX) + r"\d+\.(.+)", hf_name)
        return m is not None and m.group(1) in self.tensors

    def gguf_name(self, hf_name: str, n_layers: int) -> str | None:
        if not self.is_known(hf_name):
            return None
        return _tensor_map(self.gguf_arch, n_layers).get_name(
            hf_name, try_suffixes=(".weight", ".bias")
        )

    def hf_name(self, gguf_name: str, n_layers: int) -> str | None:
        return _reverse_names(self, n_layers).get(gguf_name)

    # -- values --------------------------------------------------------------------
    def _qk_heads(self, hf_name: str, config: dict[str, Any]) -> int | None:
        if not self.permute_qk:
            return None
        heads = int(config["num_attention_heads"])
        if hf_name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            return heads
        if hf_name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            return int(config.get("num_key_value_heads") or heads)
        return None

    def _offset(self, hf_name: str) -> float:
        return self.norm_offset if hf_name.endswith("norm.weight") else 0.0

    def to_gguf(self, hf_name: str, w: np.ndarray, config: dict[str, Any]) -> np.ndarray:
        """A tensor in llama.cpp's layout and convention, from transformers'."""
        heads = self._qk_heads(hf_name, config)
        if heads is not None:
            w = _rope_permute(w, heads)
        off = self._offset(hf_name)
        return w + np.float32(off) if off else w

    def from_gguf(self, hf_name: str, w: np.ndarray, config: dict[str, Any]) -> np.ndarray:
        heads = self._qk_heads(hf_name, config)
        if heads is not None:
            w = _rope_unpermute(w, heads)
        off = self._offset(hf_name)
        return w - np.float32(off) if off else w

    def rows_to_gguf(self, hf_name: str, w: np.ndarray, config: dict[str, Any]) -> np.ndarray:
        """Only the row order (for packed integer codes and their scales)."""
        heads = self._qk_heads(hf_name, config)
        return w if heads is None else _rope_permute(w, heads)

    # -- shapes --------------------------------------------------------------------
    def expected_shapes(self, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        """Every tensor transformers' model class has for this config, with its shape."""
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        if hidden <= 0 or heads <= 0:
            raise ValueError(
                f"hidden_size {hidden} and num_attention_heads {heads} must be positive"
            )
        kvh = int(config.get("num_key_value_heads") or heads)
        hd = head_dim(config)
        ffn = int(config["intermediate_size"])
        dims = {
            "hidden": hidden, "q": heads * hd, "kv": kvh * hd, "qkv": (heads + 2 * kvh) * hd,
            "head_dim": hd, "ffn": ffn, "ffn2": 2 * ffn, "vocab": int(config["vocab_size"]),
        }  # fmt: skip
        out = {n: tuple(dims[d] for d in s) for n, s in GLOBAL_TENSORS.items()}
        for i in range(int(config["num_hidden_layers"])):
            for suffix, shape in self.tensors.items():
                out[f"{LAYER_PREFIX}{i}.{suffix}"] = tuple(dims[d] for d in shape)
        return out


def _rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """transformers -> llama.cpp row order for q/k: llama.cpp's `llama` graph rotates
    interleaved pairs where transformers rotates halves."""
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _rope_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


@lru_cache(maxsize=32)
def _tensor_map(gguf_arch: str, n_layers: int) -> Any:
    import gguf

    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == gguf_arch)
    return gguf.get_tensor_name_map(arch, n_layers)


@lru_cache(maxsize=32)
def _reverse_names(spec: ArchSpec, n_layers: int) -> dict[str, str]:
    names = list(GLOBAL_TENSORS) + [
        f"{LAYER_PREFIX}{i}.{s}" for i in range(n_layers) for s in spec.tensors
    ]
    out: dict[str, str] = {}
    for hf in names:
        g = spec.gguf_name(hf, n_layers)
        if g is None:
            raise RuntimeError(f"gguf-py has no {spec.gguf_arch} name for {hf}")
        if g in out:
            raise RuntimeError(f"{spec.gguf_arch}: {hf} and {out[g]} both map to {g}")
        out[g] = hf
    return out


def check_shapes_for(
    spec: ArchSpec, config: dict[str, Any], shapes: dict[str, tuple[int, ...]], where: str
) -> None:
    """Reject a checkpoint whose tensors disagree with its config before any work starts."""
    try:
        expected = spec.expected_shapes(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{where}: config is missing a field or has a bad value ({exc})") from exc
    required = [n for n in expected if not n.endswith(".bias") and n != "lm_head.weight"]
    for name in required:
        if name not in shapes:
            raise InputError(f"{where}: tensor {name} is missing", "The checkpoint is incomplete")
    for name, shape in shapes.items():
        want = expected.get(name)
        if want is not None and tuple(shape) != want:
            raise InputError(
                f"{where}: tensor {name} has shape {list(shape)} but config.json implies {list(want)}",
                "The config does not belong to these weights",
            )
