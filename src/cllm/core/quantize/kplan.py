"""GPTQ onto llama.cpp's K mixes (`--method gptq --gguf-type Q4_K_M` and the like): each
tensor gets the type llama.cpp's quantizer would give it (`cllm.formats.kmix`), and GPTQ
works on that type's grid: a K grid (Q2_K ... Q6_K) or, where a row length forces
llama.cpp's fallback, the legacy grid it falls back to. Tensors GPTQ does not touch (the
embedding, an untied output) get the mix's type from cllm's byte-exact reference packer."""

from __future__ import annotations

from dataclasses import dataclass

from cllm.core.quantize.grid import GGUF_GRIDS, GGUFGrid, Grid, KGrid
from cllm.errors import UsageError
from cllm.formats.checkpoint import Checkpoint
from cllm.formats.kmix import K_MIXES, mix_types


@dataclass
class KPlan:
    grids: dict[str, Grid]  # the tensors GPTQ quantizes -> their grid
    names: list[str]  # those tensors, in the order given
    other_types: dict[str, str]  # everything else the mix types (HF name -> type)


def is_k_mix(gguf_type: str | None) -> bool:
    return (gguf_type or "").upper() in K_MIXES


def k_mix_plan(ckpt: Checkpoint, ftype: str, names: list[str]) -> KPlan:
    from cllm.formats.arch import spec_for_config

    cfg = ckpt.config
    spec = spec_for_config(cfg)
    n_layers = int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    gguf: dict[str, str] = {}
    shapes = []
    for hf, info in ckpt.tensor_infos().items():
        if len(info.shape) != 2:
            continue
        g = spec.gguf_name(hf, n_layers)
        if g is None:
            continue
        gguf[hf] = g
        shapes.append((g, (int(info.shape[1]), int(info.shape[0]))))  # ne[0] = row length
    types = mix_types(ftype.upper(), shapes, n_layers, heads, kv)
    grids: dict[str, Grid] = {}
    kept: list[str] = []
    other: dict[str, str] = {}
    selected = set(names)
    for hf, g in gguf.items():
        t = types[g]
        if hf not in selected:
            other[hf] = t
            continue
        if t.endswith("_K"):
            grids[hf] = KGrid(t)
        elif t in GGUF_GRIDS:
            grids[hf] = GGUFGrid(t)
        elif t == "F16":
            other[hf] = t  # llama.cpp keeps it in float: so does cllm
            continue
        else:
            raise UsageError(f"{hf}: llama.cpp's {ftype} gives it {t}, which GPTQ cannot target")
        kept.append(hf)
    return KPlan(grids, [n for n in names if n in grids], other)
