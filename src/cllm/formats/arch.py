"""Architecture knowledge shared by the GGUF reader and writer and by structural pruning.

One `ArchSpec` per model family maps GGUF tensor names and hyperparameters to
transformers' names and config keys, and (`ArchSpec.structure`) says which axis of
which tensor holds each attention head, KV head, FFN channel and hidden channel and
how decoder-layer tensors are named, so width and depth pruning need no model
knowledge of their own. Only `llama` is registered so far; a new family adds one
spec here and nothing else changes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cllm.errors import InputError

# GGUF per-block suffix -> transformers suffix (under model.layers.{i}.)
_LLAMA_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LLAMA_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF -> GGUF row order for q/k: llama.cpp wants interleaved rotary halves."""
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _rope_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


@dataclass(frozen=True)
class UnitAxes:
    """Where one kind of prunable unit lives: (tensor, axis) pairs.

    Unit k occupies entries [k*size, (k+1)*size) along the axis of every listed tensor
    (size is 1 for channels, head_dim for heads), so removing a unit means removing
    those entries from all of them at once: anything less leaves shapes that disagree.
    Tensors a checkpoint lacks (biases of a bias-free model, a tied lm_head) are skipped.
    """

    block: tuple[tuple[str, int], ...] = ()  # suffix under a decoder layer's prefix, axis
    globals_: tuple[tuple[str, int], ...] = ()  # full tensor name outside the layers, axis

    def block_axis(self, suffix: str) -> int | None:
        return next((axis for s, axis in self.block if s == suffix), None)

    def global_axis(self, name: str) -> int | None:
        return next((axis for n, axis in self.globals_ if n == name), None)


@dataclass(frozen=True)
class Structure:
    """What width and depth pruning need to know about a decoder-only family.

    The `*_tap` entries name the modules (relative to a decoder layer) whose inputs or
    outputs carry one value per unit, which is where activation importance is measured.
    """

    layer_prefix: str  # decoder layer i's tensors are named f"{layer_prefix}{i}.<suffix>"
    layers_key: str  # config key of the layer count
    per_layer_keys: tuple[str, ...]  # config lists holding one entry per layer
    hidden_key: str
    ffn_key: str
    heads_key: str
    kv_heads_key: str
    head_dim_key: str
    norm_eps_key: str
    ffn_channels: UnitAxes
    query_heads: UnitAxes  # units of head_dim rows/columns
    kv_heads: UnitAxes  # units of head_dim rows
    hidden_channels: UnitAxes
    norms: UnitAxes  # the RMSNorm weights (a subset of hidden_channels)
    ffn_tap: str  # its input is act(gate) * up: one value per FFN channel
    head_tap: (
        str  # its input is the heads' outputs side by side; its weight's columns map them back
    )
    norm_taps: tuple[str, ...]  # modules whose outputs are normalised hidden states
    final_norm: str  # module name of the norm after the last layer
    # transformers 5's LlamaConfig refuses a hidden_size that is not a multiple of
    # num_attention_heads ("The hidden size (518) is not a multiple of the number of attention
    # heads (9)"), even with head_dim given explicitly, so width pruning must keep it one
    hidden_multiple_of_heads: bool = False

    def layer_of(self, name: str) -> tuple[int, str] | None:
        """(layer index, suffix) of a decoder-layer tensor; None for any other tensor."""
        m = re.fullmatch(re.escape(self.layer_prefix) + r"(\d+)\.(.+)", name)
        return (int(m.group(1)), m.group(2)) if m else None

    def layer_tensor(self, i: int, suffix: str) -> str:
        return f"{self.layer_prefix}{i}.{suffix}"

    def renumbered(self, name: str, new_index: dict[int, int]) -> str | None:
        """The name `name` takes when layers are renumbered by `new_index` (old -> new);
        None for a tensor of a layer that is not kept. Non-layer tensors keep their name."""
        where = self.layer_of(name)
        if where is None:
            return name
        i, suffix = where
        return self.layer_tensor(new_index[i], suffix) if i in new_index else None


_LLAMA_STRUCTURE = Structure(
    layer_prefix="model.layers.",
    layers_key="num_hidden_layers",
    per_layer_keys=("layer_types",),
    hidden_key="hidden_size",
    ffn_key="intermediate_size",
    heads_key="num_attention_heads",
    kv_heads_key="num_key_value_heads",
    head_dim_key="head_dim",
    norm_eps_key="rms_norm_eps",
    ffn_channels=UnitAxes(
        block=(
            ("mlp.gate_proj.weight", 0),
            ("mlp.up_proj.weight", 0),
            ("mlp.gate_proj.bias", 0),
            ("mlp.up_proj.bias", 0),
            ("mlp.down_proj.weight", 1),
        )
    ),
    query_heads=UnitAxes(
        block=(
            ("self_attn.q_proj.weight", 0),
            ("self_attn.q_proj.bias", 0),
            ("self_attn.o_proj.weight", 1),
        )
    ),
    kv_heads=UnitAxes(
        block=(
            ("self_attn.k_proj.weight", 0),
            ("self_attn.v_proj.weight", 0),
            ("self_attn.k_proj.bias", 0),
            ("self_attn.v_proj.bias", 0),
        )
    ),
    hidden_channels=UnitAxes(
        block=(
            ("input_layernorm.weight", 0),
            ("post_attention_layernorm.weight", 0),
            ("self_attn.q_proj.weight", 1),
            ("self_attn.k_proj.weight", 1),
            ("self_attn.v_proj.weight", 1),
            ("self_attn.o_proj.weight", 0),
            ("self_attn.o_proj.bias", 0),
            ("mlp.gate_proj.weight", 1),
            ("mlp.up_proj.weight", 1),
            ("mlp.down_proj.weight", 0),
            ("mlp.down_proj.bias", 0),
        ),
        globals_=(
            ("model.embed_tokens.weight", 1),
            ("model.norm.weight", 0),
            ("lm_head.weight", 1),
        ),
    ),
    norms=UnitAxes(
        block=(("input_layernorm.weight", 0), ("post_attention_layernorm.weight", 0)),
        globals_=(("model.norm.weight", 0),),
    ),
    ffn_tap="mlp.down_proj",
    head_tap="self_attn.o_proj",
    norm_taps=("input_layernorm", "post_attention_layernorm"),
    final_norm="model.norm",
    hidden_multiple_of_heads=True,
)


@dataclass(frozen=True)
class ArchSpec:
    gguf_arch: str
    hf_architecture: str
    model_type: str
    block: dict[str, str]
    globals_: dict[str, str]
    # tensors that need a row permutation between HF and GGUF: suffix -> config key of head count
    permuted: dict[str, str] = field(default_factory=dict)
    ignored_gguf: tuple[str, ...] = ()
    structure: Structure | None = None  # None: width/depth pruning not supported

    def hf_name(self, gguf_name: str) -> str | None:
        if gguf_name in self.globals_:
            return self.globals_[gguf_name]
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
        if m and m.group(2) in self.block:
            return f"model.layers.{m.group(1)}.{self.block[m.group(2)]}"
        return None

    def gguf_name(self, hf_name: str) -> str | None:
        for g, h in self.globals_.items():
            if h == hf_name:
                return g
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
        if m:
            for g, h in self.block.items():
                if h == m.group(2):
                    return f"blk.{m.group(1)}.{g}"
        return None

    def _heads_for(self, hf_name: str, config: dict[str, Any]) -> int | None:
        for suffix, key in self.permuted.items():
            if hf_name.endswith(suffix):
                return int(config.get(key) or config["num_attention_heads"])
        return None

    def to_gguf_rows(self, hf_name: str, w: np.ndarray, config: dict[str, Any]) -> np.ndarray:
        heads = self._heads_for(hf_name, config)
        return w if heads is None else _rope_permute(w, heads)

    def from_gguf_rows(self, hf_name: str, w: np.ndarray, config: dict[str, Any]) -> np.ndarray:
        heads = self._heads_for(hf_name, config)
        return w if heads is None else _rope_unpermute(w, heads)


LLAMA = ArchSpec(
    gguf_arch="llama",
    hf_architecture="LlamaForCausalLM",
    model_type="llama",
    block=_LLAMA_BLOCK,
    globals_=_LLAMA_GLOBAL,
    permuted={
        "self_attn.q_proj.weight": "num_attention_heads",
        "self_attn.k_proj.weight": "num_key_value_heads",
        "self_attn.q_proj.bias": "num_attention_heads",
        "self_attn.k_proj.bias": "num_key_value_heads",
    },
    ignored_gguf=("rope_freqs.weight",),
    structure=_LLAMA_STRUCTURE,
)

ARCHS: dict[str, ArchSpec] = {"llama": LLAMA}
_BY_MODEL_TYPE = {a.model_type: a for a in ARCHS.values()}


def spec_for_gguf(arch: str) -> ArchSpec:
    try:
        return ARCHS[arch]
    except KeyError:
        raise InputError(
            f"GGUF architecture '{arch}' is not supported yet",
            "Supported: " + ", ".join(sorted(ARCHS)),
        ) from None


def spec_for_config(config: dict[str, Any]) -> ArchSpec:
    mt = str(config.get("model_type", ""))
    if mt in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[mt]
    raise InputError(
        f"model type '{mt or '?'}' cannot be written as GGUF yet",
        "Supported: " + ", ".join(sorted(_BY_MODEL_TYPE)),
    )


def structure_for_config(config: dict[str, Any]) -> Structure:
    """The tensor layout pruning works on; a family without one is refused up front."""
    mt = str(config.get("model_type", ""))
    spec = _BY_MODEL_TYPE.get(mt)
    if spec is None or spec.structure is None:
        known = sorted(a.model_type for a in ARCHS.values() if a.structure is not None)
        raise InputError(
            f"model type '{mt or '?'}' cannot be pruned structurally yet",
            "Supported: " + ", ".join(known),
        )
    return spec.structure


# -- hyperparameters --------------------------------------------------------
def llama_config_from_gguf(
    kv: Callable[[str, Any], Any], arch: str, n_vocab: int
) -> dict[str, Any]:
    """transformers LlamaConfig kwargs from GGUF keys (kv(name, default))."""
    hidden = int(kv(f"{arch}.embedding_length", 0))
    heads = int(kv(f"{arch}.attention.head_count", 0))
    if not hidden or not heads:
        raise InputError("GGUF file lacks embedding_length or attention.head_count")
    head_dim = int(
        kv(f"{arch}.attention.key_length", 0)
        or kv(f"{arch}.rope.dimension_count", 0)
        or hidden // heads
    )
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(kv(f"{arch}.feed_forward_length", 0)),
        "num_hidden_layers": int(kv(f"{arch}.block_count", 0)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(kv(f"{arch}.context_length", 2048)),
        "rms_norm_eps": float(kv(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(kv(f"{arch}.rope.freq_base", 10000.0)),
        "vocab_size": int(kv(f"{arch}.vocab_size", n_vocab) or n_vocab),
        "bos_token_id": kv("tokenizer.ggml.bos_token_id", None),
        "eos_token_id": kv("tokenizer.ggml.eos_token_id", None),
        "pad_token_id": kv("tokenizer.ggml.padding_token_id", None),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }


def llama_expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Shapes transformers will expect for each llama tensor, from config alone."""
    h = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    if h <= 0 or heads <= 0:
        raise ValueError(f"hidden_size {h} and num_attention_heads {heads} must be positive")
    kvh = int(config.get("num_key_value_heads") or heads)
    hd = int(config.get("head_dim") or h // heads)
    inter = int(config["intermediate_size"])
    vocab = int(config["vocab_size"])
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (vocab, h),
    }
    for i in range(int(config["num_hidden_layers"])):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (heads * hd, h),
                p + "self_attn.k_proj.weight": (kvh * hd, h),
                p + "self_attn.v_proj.weight": (kvh * hd, h),
                p + "self_attn.o_proj.weight": (h, heads * hd),
                p + "self_attn.q_proj.bias": (heads * hd,),
                p + "self_attn.k_proj.bias": (kvh * hd,),
                p + "self_attn.v_proj.bias": (kvh * hd,),
                p + "self_attn.o_proj.bias": (h,),
                p + "mlp.gate_proj.weight": (inter, h),
                p + "mlp.up_proj.weight": (inter, h),
                p + "mlp.down_proj.weight": (h, inter),
            }
        )
    return shapes


def check_shapes(config: dict[str, Any], shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Reject a checkpoint whose tensors disagree with its config before any work starts."""
    if config.get("model_type") != "llama":
        return
    try:
        expected = llama_expected_shapes(config)
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
