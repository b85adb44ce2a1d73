"""What width and depth pruning need to know about a decoder-only family's tensors.

`Structure` says which axis of which tensor holds each attention head, KV head, FFN
channel and hidden channel, so the pruning code never names a projection itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace


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
class Layers:
    """How decoder layers are named and counted: all that depth pruning needs, so it works
    for families whose width cannot be pruned (Phi-3's fused projections)."""

    layer_prefix: str  # decoder layer i's tensors are named f"{layer_prefix}{i}.<suffix>"
    layers_key: str  # config key of the layer count
    per_layer_keys: tuple[str, ...]  # config lists holding one entry per layer

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


DECODER_LAYERS = Layers("model.layers.", "num_hidden_layers", ("layer_types",))


@dataclass(frozen=True)
class Structure(Layers):
    """What width pruning needs to know about a decoder-only family, besides its layers.

    The `*_tap` entries name the modules (relative to a decoder layer) whose inputs or
    outputs carry one value per unit, which is where activation importance is measured.
    """

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
    # None: the hidden width can be pruned; else the reason it cannot (said to the user)
    hidden_fixed: str | None = None


LLAMA_STRUCTURE = Structure(
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


# Gemma 3: sandwich norms around attention and MLP. Its embeddings are multiplied by
# sqrt(hidden_size) inside the model, so a narrower hidden width would rescale every
# token's embedding; the hidden width is therefore kept.
GEMMA3_STRUCTURE = replace(
    LLAMA_STRUCTURE,
    hidden_channels=UnitAxes(
        block=LLAMA_STRUCTURE.hidden_channels.block
        + (("pre_feedforward_layernorm.weight", 0), ("post_feedforward_layernorm.weight", 0)),
        globals_=LLAMA_STRUCTURE.hidden_channels.globals_,
    ),
    norms=UnitAxes(
        block=LLAMA_STRUCTURE.norms.block
        + (("pre_feedforward_layernorm.weight", 0), ("post_feedforward_layernorm.weight", 0)),
        globals_=LLAMA_STRUCTURE.norms.globals_,
    ),
    norm_taps=("input_layernorm", "pre_feedforward_layernorm"),
    hidden_fixed="Gemma 3 scales its embeddings by sqrt(hidden_size), so its hidden width is kept",
)
