"""What `cllm info` reports about a checkpoint: shape of the model, storage mix, provenance."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cllm.formats.checkpoint import Checkpoint
from cllm.formats.provenance import chain


@dataclass
class TypeStat:
    tensors: int = 0
    params: int = 0
    bytes: int = 0


@dataclass
class InfoReport:
    path: str
    format: str
    architecture: str
    layers: int | None
    hidden_size: int | None
    heads: int | None
    kv_heads: int | None
    vocab_size: int | None
    context_length: int | None
    params: int
    tensor_bytes: int
    file_bytes: int
    bits_per_weight: float
    types: dict[str, TypeStat]
    sparsity: float | None
    sha256: str | None
    provenance: list[dict[str, Any]] = field(default_factory=list)
    # over the linear weights of decoder layers only (what pruning and quantization touch)
    linear_sparsity: float | None = None
    sparsity_layers: list[float] | None = None  # per decoder layer, over its linear weights
    nm_pattern: str | None = None  # e.g. "2:4" when every linear weight follows it
    family: str | None = None  # e.g. "Qwen3"; None for an architecture cllm does not know
    features: list[str] = field(default_factory=list)  # what sets this model apart from Llama

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SparsityCounter:
    """Exact zeros, counted tensor by tensor as they stream past (one tensor in memory).

    Besides the overall count it keeps, for the linear weights of decoder layers, zeros per
    layer and, per group size M, the most nonzeros of any group of M consecutive inputs:
    enough to name an N:M pattern at the end without a second pass.
    """

    def __init__(self, n_layers: int | None) -> None:
        self.zeros = 0
        self.params = 0
        self.layer_zeros = [0] * (n_layers or 0)
        self.layer_params = [0] * (n_layers or 0)
        self.max_nonzeros: dict[int, int] | None = None  # None until a linear weight is seen

    def add(self, name: str, t: Any) -> None:
        from cllm.core.quantize.sparsity import max_nonzeros_per_group, nonzero_array

        nz = nonzero_array(t)
        zeros = int(nz.size - np.count_nonzero(nz))
        self.zeros += zeros
        self.params += nz.size
        layer = _linear_layer(name, nz.ndim)
        if layer is None:
            return
        if layer >= len(self.layer_zeros):
            grow = layer + 1 - len(self.layer_zeros)
            self.layer_zeros += [0] * grow
            self.layer_params += [0] * grow
        self.layer_zeros[layer] += zeros
        self.layer_params[layer] += nz.size
        groups = max_nonzeros_per_group(nz)
        if self.max_nonzeros is None:
            self.max_nonzeros = groups
        else:  # an M some weight's rows cannot be tiled by drops out
            self.max_nonzeros = {
                m: max(n, groups[m]) for m, n in self.max_nonzeros.items() if m in groups
            }

    @property
    def sparsity(self) -> float:
        return self.zeros / self.params if self.params else 0.0

    @property
    def linear_sparsity(self) -> float | None:
        total = sum(self.layer_params)
        return sum(self.layer_zeros) / total if total else None

    @property
    def layers(self) -> list[float]:
        return [
            z / p if p else 0.0 for z, p in zip(self.layer_zeros, self.layer_params, strict=True)
        ]

    @property
    def nm_pattern(self) -> str | None:
        from cllm.core.quantize.sparsity import nm_pattern

        linear = self.linear_sparsity
        if linear is None or not self.max_nonzeros:
            return None
        return nm_pattern(self.max_nonzeros, linear)


_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.")


def _linear_layer(name: str, ndim: int) -> int | None:
    """The decoder layer of a linear weight (what `cllm quantize` and `cllm prune` select)."""
    from cllm.core.quantize.methods import LINEAR_RE

    if ndim != 2 or not LINEAR_RE.search(name):
        return None
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def inspect_checkpoint(
    ckpt: Checkpoint,
    sparsity: bool = True,
    with_hash: bool = True,
    on_tensor: Callable[[str], None] | None = None,
) -> InfoReport:
    """Summarise a checkpoint. Sparsity reads every tensor once (streamed), the rest is header-only."""
    cfg = ckpt.config
    family, features = describe_family(cfg)
    types: dict[str, TypeStat] = {}
    params = 0
    tensor_bytes = 0
    counter = SparsityCounter(cfg.get("num_hidden_layers")) if sparsity else None
    for name, info in ckpt.tensor_infos().items():
        st = types.setdefault(info.dtype, TypeStat())
        st.tensors += 1
        st.params += info.numel
        st.bytes += info.nbytes
        params += info.numel
        tensor_bytes += info.nbytes
        if counter is not None:
            counter.add(name, ckpt.get(name))
            if on_tensor:
                on_tensor(name)
    return InfoReport(
        path=str(ckpt.path),
        format=ckpt.format,
        architecture=ckpt.architecture,
        layers=cfg.get("num_hidden_layers"),
        hidden_size=cfg.get("hidden_size"),
        heads=cfg.get("num_attention_heads"),
        kv_heads=cfg.get("num_key_value_heads"),
        vocab_size=cfg.get("vocab_size"),
        context_length=cfg.get("max_position_embeddings"),
        params=params,
        tensor_bytes=tensor_bytes,
        file_bytes=ckpt.file_size,
        bits_per_weight=(tensor_bytes * 8 / params) if params else 0.0,
        types=dict(sorted(types.items(), key=lambda kv: -kv[1].params)),
        sparsity=counter.sparsity if counter is not None else None,
        sha256=ckpt.sha256 if with_hash else None,
        provenance=[
            {k: p.get(k) for k in ("op", "params", "created", "command", "calibration", "seed")}
            | {
                "parent_sha256": (p.get("parent") or {}).get("sha256"),
                "versions": p.get("versions"),
            }
            | ({"result": p["result"]} if "result" in p else {})  # what a training run reached
            for p in chain(ckpt.provenance)
        ],
        linear_sparsity=counter.linear_sparsity if counter is not None else None,
        sparsity_layers=counter.layers if counter is not None else None,
        nm_pattern=counter.nm_pattern if counter is not None else None,
        family=family,
        features=features,
    )


def describe_family(config: dict[str, Any]) -> tuple[str | None, list[str]]:
    """The family's name and this model's distinguishing features; (None, []) for a model
    type cllm does not support (info still shows what the file holds)."""
    from cllm.errors import CllmError
    from cllm.formats.arch import spec_for_config
    from cllm.formats.arch.describe import features

    try:
        spec = spec_for_config(config)
        return spec.label, features(spec, config)
    except (CllmError, KeyError, TypeError, ValueError):
        return None, []


def inspect_folder_artifact(path: Path) -> dict[str, Any] | None:
    """An ONNX export folder or an edge bundle (None for anything else): its files, graph
    operators and weight types, and the provenance chain it recorded."""
    import json
    from collections import Counter

    from cllm.formats.onnx_io import is_onnx, model_file, read_side_file

    path = Path(path)
    manifest = path / "manifest.json" if path.is_dir() else None
    report: dict[str, Any] = {"path": str(path)}
    if manifest is not None and manifest.is_file():
        m = json.loads(manifest.read_text())
        report.update(format="bundle", target=m.get("target"),
                      runtime=(m.get("runtime") or {}).get("name"),
                      sha256=(m.get("model") or {}).get("sha256"))  # fmt: skip
        prov = m.get("provenance")
    elif is_onnx(path):
        import onnx

        model = onnx.load(str(model_file(path)), load_external_data=False)
        report["format"] = "onnx"
        report["operators"] = dict(Counter(n.op_type for n in model.graph.node).most_common())
        names = {int(v): k for k, v in onnx.TensorProto.DataType.items()}
        report["weight_types"] = dict(
            Counter(names.get(t.data_type, str(t.data_type)) for t in model.graph.initializer)
        )
        prov = read_side_file(path).get("provenance")
    else:
        return None
    from cllm.formats.hashing import artifact_files

    report["file_bytes"] = sum(f.stat().st_size for f in artifact_files(path))
    report["provenance"] = [
        {k: p.get(k) for k in ("op", "params", "created", "command")}
        | {"parent_sha256": (p.get("parent") or {}).get("sha256"), "versions": p.get("versions")}
        | ({"result": p["result"]} if "result" in p else {})
        for p in chain(prov)
    ]
    return report
