"""Writing quantized models: packed safetensors, dense ("fake") safetensors, GGUF on an
exact llama.cpp grid, and GGUF through llama.cpp's own quantizer."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cllm.core.quantize.grid import GGUFGrid, GridPlan, IntGrid, KGrid, grid_for, layer_of
from cllm.errors import RuntimeFailure, UsageError
from cllm.formats.atomic import atomic_path
from cllm.formats.checkpoint import Checkpoint
from cllm.formats.outputs import Kind
from cllm.formats.safetensors_io import PlannedTensor

Progress = Callable[[str], None]


def _tick(progress: Progress | None, name: str) -> None:
    if progress:
        progress(name)


def dense_override(store: Any, name: str) -> torch.Tensor | None:
    """The store's replacement for an unquantized tensor (AWQ's folded norm weights), if any."""
    get = getattr(store, "get_dense", None)
    return None if get is None else get(name)


def _overridden(p: PlannedTensor, store: Any) -> PlannedTensor:
    """`p`, reading the store's replacement of the tensor when it has one (in p's dtype)."""
    from cllm.formats.save import FLOAT_DTYPES

    def produce(p: PlannedTensor = p) -> torch.Tensor:
        t = dense_override(store, p.name)
        if t is None:
            return p.produce()
        return t.to(getattr(torch, FLOAT_DTYPES[p.dtype])) if p.dtype in FLOAT_DTYPES else t

    return PlannedTensor(p.name, p.shape, p.dtype, produce)


def write_fake(
    out: Path,
    ckpt: Checkpoint,
    store: Any,
    names: list[str],
    provenance: dict[str, Any],
    progress: Progress | None,
) -> dict[str, Any]:
    """Dense fp32 weights holding the dequantized values (for research and for any loader)."""
    from cllm.formats.save import plan_tensors, save_hf_folder

    plans = []
    for p in plan_tensors(ckpt, "F32"):
        if p.name in store:

            def produce(name: str = p.name) -> torch.Tensor:
                w = store.get(name).dequantize().float()
                _tick(progress, name)
                return w

            plans.append(PlannedTensor(p.name, p.shape, "F32", produce))
        else:
            plans.append(_overridden(p, store))
    save_hf_folder(out, ckpt.config, plans, ckpt.tokenizer_dir(), provenance, ckpt.gguf_kv)
    return {"format": "safetensors (dense, dequantized)"}


def write_packed(
    out: Path,
    ckpt: Checkpoint,
    store: Any,
    names: list[str],
    grid: IntGrid,
    provenance: dict[str, Any],
    progress: Progress | None,
) -> dict[str, Any]:
    """compressed-tensors pack-quantized HF folder: transformers loads it on CPU as is."""
    from cllm.formats import compressed_tensors as ct
    from cllm.formats.save import plan_tensors, save_hf_folder

    infos = ckpt.tensor_infos()
    plans: list[PlannedTensor] = []
    for p in plan_tensors(ckpt, None):
        if p.name not in store:
            plans.append(_overridden(p, store))
            continue
        rows, cols = infos[p.name].shape
        prefix = p.name[: -len(".weight")]
        for key, (shape, dtype) in ct.planned_shapes(
            rows, cols, grid.bits, grid.group_size, grid.symmetric
        ).items():

            def produce(name: str = p.name, key: str = key, prefix: str = prefix) -> torch.Tensor:
                r = store.get(name)
                tensors = ct.linear_tensors(
                    prefix,
                    r.codes,
                    r.scales,
                    None if grid.symmetric else r.zeros,
                    grid.bits,
                    grid.group_size,
                )
                if key == "weight_packed":
                    _tick(progress, name)
                return tensors[f"{prefix}.{key}"]

            plans.append(PlannedTensor(f"{prefix}.{key}", shape, dtype, produce))
    config = dict(ckpt.config)
    ignore = ["lm_head"] + [
        n[: -len(".weight")] for n in infos if n.endswith("_proj.weight") and n not in store
    ]
    config["quantization_config"] = ct.quantization_config(
        grid.bits, grid.group_size, grid.symmetric, ignore
    )
    save_hf_folder(
        out,
        config,
        plans,
        ckpt.tokenizer_dir(),
        provenance,
        ckpt.gguf_kv,
        keep_quantization_config=True,
    )
    return {"format": f"compressed-tensors pack-quantized ({grid.describe()})"}


def _gguf_qtype(grid: Any) -> str:
    if not isinstance(grid, (GGUFGrid, KGrid)):
        raise UsageError("GGUF output needs a GGUF grid")
    return grid.qtype


def write_gguf_recipe(
    out: Path,
    ckpt: Checkpoint,
    names: list[str],
    qtype: str | dict[str, str],
    produce_quantized: Callable[[str], Any],
    provenance: dict[str, Any],
    progress: Progress | None,
    store: Any = None,
    other_types: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A standard GGUF with llama.cpp's recipe for its legacy types, streamed tensor by tensor.

    The selected Linear weights get `qtype` (as codes from GPTQ/AWQ, or as floats that gguf-py
    rounds exactly like llama.cpp); the embedding matrix (also the output when tied) and an
    untied output get Q8_0, as llama.cpp keeps them (it picks Q6_K where rows are multiples of
    256; gguf-py cannot write Q6_K, so cllm's file is slightly larger there); tensors left out
    with --keep get F16; norms stay F32. Unquantized tensors the method replaced (AWQ's
    folded norms) are read from `store`.
    """
    from cllm.formats.gguf_io import GGUFTensorPlan, write_gguf

    selected = set(names)
    per_name = qtype if isinstance(qtype, dict) else dict.fromkeys(names, qtype)
    file_type = Counter(per_name.values()).most_common(1)[0][0] if per_name else "F16"
    plans = []
    for name, info in ckpt.tensor_infos().items():
        tq: str
        if name in selected:
            tq = per_name[name]

            def produce(name: str = name) -> Any:
                value = produce_quantized(name)
                _tick(progress, name)
                return value

        else:
            if other_types and name in other_types:
                tq = other_types[name]
            elif len(info.shape) < 2:
                tq = "F32"
            elif (
                name in ("model.embed_tokens.weight", "lm_head.weight") and info.shape[-1] % 32 == 0
            ):
                tq = "Q8_0"
            else:
                tq = "F16"

            def produce(name: str = name) -> Any:
                dense = dense_override(store, name)
                t = (ckpt.get(name) if dense is None else dense).float().numpy()
                _tick(progress, name)
                return t

        plans.append(GGUFTensorPlan(name, info.shape, produce, tq))
    with atomic_path(out, Kind.GGUF) as tmp:
        counts = write_gguf(
            tmp, ckpt.config, plans, file_type, ckpt.tokenizer_dir(), ckpt.gguf_kv, provenance
        )
    return {"types": counts}


def write_gguf_grid(
    out: Path,
    ckpt: Checkpoint,
    store: Any,
    names: list[str],
    grid: GridPlan,
    provenance: dict[str, Any],
    progress: Progress | None,
    other_types: dict[str, str] | None = None,
) -> dict[str, Any]:
    """GPTQ/AWQ results stored exactly: the blocks hold the method's codes and scales.
    `other_types`: types of tensors the method did not quantize (a K mix's embedding)."""
    from cllm.formats.gguf_io import PackedBlocks, PackedRaw

    def packed(name: str) -> Any:
        r = store.get(name)
        if r.raw is not None:
            return PackedRaw(r.raw.numpy())
        return PackedBlocks(r.codes.numpy(), r.scales.numpy(), r.zeros.numpy())

    types = {n: _gguf_qtype(grid_for(grid, layer_of(n), n)) for n in names}
    report = write_gguf_recipe(
        out, ckpt, names, types, packed, provenance, progress, store=store,
        other_types=other_types,
    )  # fmt: skip
    mix = sorted(set(types.values()))
    report["format"] = f"GGUF ({'/'.join(mix)} grid{'s' if len(mix) > 1 else ''})"
    return report


def write_gguf_rtn(
    out: Path,
    ckpt: Checkpoint,
    names: list[str],
    qtype: str | dict[str, str],
    provenance: dict[str, Any],
    progress: Progress | None,
) -> dict[str, Any]:
    """RTN to a type gguf-py writes: llama.cpp's reference rounding, cllm's streaming writer."""

    def floats(name: str) -> Any:
        return ckpt.get(name).float().numpy()

    report = write_gguf_recipe(out, ckpt, names, qtype, floats, provenance, progress)
    mix = "/".join(sorted(set(qtype.values()))) if isinstance(qtype, dict) else qtype
    report["format"] = f"GGUF {mix} (RTN, llama.cpp reference rounding)"
    return report


def write_gguf_llamacpp(
    out: Path,
    ckpt: Checkpoint,
    ftype: str,
    provenance: dict[str, Any],
    progress: Progress | None,
    imatrix: Any = None,
) -> dict[str, Any]:
    """Any llama.cpp type (K-quants, IQ, legacy) with llama.cpp's own quantizer and recipes.

    cllm writes an F32 GGUF of the input (carrying the final provenance, which llama.cpp
    copies), then calls llama_model_quantize on it, with the importance matrix if one is
    given (written beside it as a GGUF imatrix file for the worker process to read).
    """
    try:
        import llama_cpp
    except ImportError as exc:
        raise UsageError(
            "GGUF K-quant and IQ types need llama-cpp-python", "pip install llama-cpp-python"
        ) from exc
    from gguf import GGUFReader

    from cllm.core.worker import run_isolated
    from cllm.formats.save import save_gguf

    ftype_id = (
        getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}", None)
        if ftype not in ("F32",)
        else llama_cpp.LLAMA_FTYPE_ALL_F32
    )
    if ftype_id is None:
        raise UsageError(f"llama.cpp has no file type {ftype}")
    from cllm.core.native import llama_accepts_imatrix
    from cllm.core.quantize.api import NEEDS_IMATRIX

    if ftype in NEEDS_IMATRIX and imatrix is None:
        raise UsageError(
            f"llama.cpp's {ftype} needs an importance matrix", "Add --imatrix auto (or a file)"
        )
    if imatrix is not None and not llama_accepts_imatrix():
        raise UsageError(
            f"llama-cpp-python {getattr(llama_cpp, '__version__', '?')} cannot pass an importance matrix",
            "Upgrade it: pip install 'llama-cpp-python>=0.3.20'",
        )
    report: dict[str, Any] = {}
    with atomic_path(out, Kind.GGUF) as tmp:
        # named from the output's own name, so that no output name (an `-o imatrix.gguf`
        # did) can be the same file as these
        f32 = tmp.with_name(tmp.name + ".input-f32.gguf")
        save_gguf(f32, ckpt, "F32", provenance, progress)
        im_file = None
        if imatrix is not None:
            from cllm.core.quantize.imatrix import entries_for
            from cllm.formats.imatrix import write_imatrix

            shapes = {t.name: tuple(int(d) for d in t.shape) for t in GGUFReader(f32).tensors}
            report["imatrix_entries"] = entries_for(imatrix, shapes, "given")
            im_file = tmp.with_name(tmp.name + ".imatrix.gguf")
            write_imatrix(imatrix, im_file)
        rc = run_isolated("llama.cpp's quantizer", f"quantizing to {ftype}",
                          "cllm.core.native:llama_quantize_file", str(f32), str(tmp), ftype_id,
                          str(im_file) if im_file else None)  # fmt: skip
        f32.unlink()
        if im_file is not None:
            im_file.unlink()
        if rc != 0:
            raise RuntimeFailure(f"llama.cpp's quantizer failed for {ftype} (code {rc})")
        counts = Counter(t.tensor_type.name for t in GGUFReader(tmp).tensors)
    with_im = " with an importance matrix" if imatrix is not None else ""
    report.update({"format": f"GGUF {ftype} (llama.cpp quantizer{with_im})", "types": dict(counts)})
    return report


def type_mix(report: dict[str, Any]) -> str:
    return json.dumps(report.get("types", {}), sort_keys=True)
