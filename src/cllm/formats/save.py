"""Writing checkpoints in every output layout, from any Checkpoint, tensor by tensor."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cllm.errors import UsageError
from cllm.formats.atomic import atomic_path
from cllm.formats.checkpoint import Checkpoint
from cllm.formats.outputs import Kind
from cllm.formats.safetensors_io import (
    META_CONFIG,
    META_GGUF_KV,
    META_PROVENANCE,
    META_TOKENIZER,
    TOKENIZER_FILES,
    PlannedTensor,
    write_safetensors_file,
)

if TYPE_CHECKING:
    import torch

Progress = Callable[[str], None]
FLOAT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def plan_tensors(
    ckpt: Checkpoint, dtype: str | None = None, progress: Progress | None = None
) -> list[PlannedTensor]:
    """Plan every tensor of `ckpt` for a safetensors write.

    Quantized GGUF tensors become float32 (or `dtype`); float tensors keep their
    type unless `dtype` says otherwise. Nothing is read until the writer asks.
    """
    import torch

    plans = []
    for name, info in ckpt.tensor_infos().items():
        if dtype is not None:
            target = dtype
        elif info.dtype in FLOAT_DTYPES or info.dtype in (
            "I64",
            "I32",
            "I16",
            "I8",
            "U8",
            "BOOL",
            "F64",
        ):
            target = info.dtype
        else:
            target = "F32"
        tdtype = getattr(torch, FLOAT_DTYPES[target]) if target in FLOAT_DTYPES else None

        def produce(name: str = name, tdtype: Any = tdtype) -> torch.Tensor:
            t = ckpt.get(name)
            if progress:
                progress(name)
            return t.to(tdtype) if tdtype is not None and t.is_floating_point() else t

        plans.append(PlannedTensor(name, info.shape, target, produce))
    return plans


def _tokenizer_files(tokenizer_dir: Path) -> dict[str, str]:
    out = {}
    for fname in TOKENIZER_FILES:
        p = tokenizer_dir / fname
        if p.exists():
            out[fname] = p.read_text(encoding="utf-8")
    if "tokenizer.json" not in out:
        raise UsageError(
            f"no tokenizer.json in {tokenizer_dir}", "Only fast tokenizers can be embedded"
        )
    return out


def _metadata(
    config: dict[str, Any], provenance: dict[str, Any], gguf_kv: dict[str, Any]
) -> dict[str, str]:
    meta = {META_PROVENANCE: json.dumps(provenance, sort_keys=True), "format": "pt"}
    if gguf_kv:
        meta[META_GGUF_KV] = json.dumps(gguf_kv, sort_keys=True)
    return meta


def save_single_file(
    out: Path,
    config: dict[str, Any],
    plans: list[PlannedTensor],
    tokenizer_dir: Path,
    provenance: dict[str, Any],
    gguf_kv: dict[str, Any],
) -> Path:
    meta = _metadata(config, provenance, gguf_kv)
    dense = {
        k: v for k, v in config.items() if k != "quantization_config"
    }  # tensors written here are dense
    meta[META_CONFIG] = json.dumps(dense, sort_keys=True)
    meta[META_TOKENIZER] = json.dumps(_tokenizer_files(tokenizer_dir), sort_keys=True)
    with atomic_path(out, Kind.SAFETENSORS_FILE) as tmp:
        write_safetensors_file(tmp, plans, meta)
    return out


def save_hf_folder(
    out: Path,
    config: dict[str, Any],
    plans: list[PlannedTensor],
    tokenizer_dir: Path,
    provenance: dict[str, Any],
    gguf_kv: dict[str, Any],
    keep_quantization_config: bool = False,
) -> Path:
    """An HF folder transformers loads with from_pretrained (one shard; provenance in its metadata)."""
    meta = _metadata(config, provenance, gguf_kv)
    with atomic_path(out, Kind.HF_FOLDER) as tmp:
        tmp.mkdir()
        cfg = dict(config)
        if not keep_quantization_config:
            cfg.pop("quantization_config", None)
        dtypes = {p.dtype for p in plans if p.dtype in FLOAT_DTYPES}
        if len(dtypes) == 1:
            cfg["torch_dtype"] = FLOAT_DTYPES[dtypes.pop()]
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        for fname in TOKENIZER_FILES:
            src = tokenizer_dir / fname
            if src.exists():
                shutil.copyfile(src, tmp / fname)
        write_safetensors_file(tmp / "model.safetensors", plans, meta)
    return out


def save_gguf(
    out: Path,
    ckpt: Checkpoint,
    gguf_type: str,
    provenance: dict[str, Any],
    progress: Progress | None = None,
) -> dict[str, int]:
    from cllm.formats.gguf_io import GGUFTensorPlan, write_gguf

    plans = []
    for name, info in ckpt.tensor_infos().items():

        def produce(name: str = name) -> Any:
            t = ckpt.get(name)
            if progress:
                progress(name)
            return t.float().numpy()

        plans.append(GGUFTensorPlan(name, info.shape, produce))
    with atomic_path(out, Kind.GGUF) as tmp:
        return write_gguf(
            tmp, ckpt.config, plans, gguf_type, ckpt.tokenizer_dir(), ckpt.gguf_kv, provenance
        )
