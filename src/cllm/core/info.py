"""What `cllm info` reports about a checkpoint: shape of the model, storage mix, provenance."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def inspect_checkpoint(
    ckpt: Checkpoint,
    sparsity: bool = True,
    with_hash: bool = True,
    on_tensor: Callable[[str], None] | None = None,
) -> InfoReport:
    """Summarise a checkpoint. Sparsity reads every tensor once (streamed), the rest is header-only."""
    cfg = ckpt.config
    types: dict[str, TypeStat] = {}
    params = 0
    tensor_bytes = 0
    zeros = 0
    for name, info in ckpt.tensor_infos().items():
        st = types.setdefault(info.dtype, TypeStat())
        st.tensors += 1
        st.params += info.numel
        st.bytes += info.nbytes
        params += info.numel
        tensor_bytes += info.nbytes
        if sparsity:
            t = ckpt.get(name)
            zeros += int((t == 0).sum())
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
        sparsity=(zeros / params if params else 0.0) if sparsity else None,
        sha256=ckpt.sha256 if with_hash else None,
        provenance=[
            {k: p.get(k) for k in ("op", "params", "created", "command", "calibration", "seed")}
            | {
                "parent_sha256": (p.get("parent") or {}).get("sha256"),
                "versions": p.get("versions"),
            }
            for p in chain(ckpt.provenance)
        ],
    )


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
        for p in chain(prov)
    ]
    return report
