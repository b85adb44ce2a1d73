"""compressed-tensors "pack-quantized" layout: packed integer Linear weights that
transformers (>= 5, with compressed-tensors >= 0.20) loads on CPU.

Per quantized Linear `<prefix>` a checkpoint holds:

- `<prefix>.weight_packed`: int32 `[out, ceil(in * bits / 32)]`. Each row is a dense
  little-endian bit stream: element j occupies bits `j*bits .. j*bits+bits-1`, and
  elements straddle word boundaries (no padding bits; compressed-tensors 0.20 packs
  3/5/6/7 bits this way, older versions did not). The value stored is the signed
  integer plus 2^(bits-1), which is exactly cllm's unsigned `IntGrid` code when the
  grid's zero point is 2^(bits-1) (symmetric grids).
- `<prefix>.weight_scale`: `[out, in / group_size]` (`[out, 1]` per channel), in the
  model's float dtype (the loader casts it to the dtype it creates the parameter in).
- `<prefix>.weight_shape`: int64 `[2]` = `[out, in]`.
- asymmetric only: `<prefix>.weight_zero_point`: int32 `[out, in / group_size]`. The
  zero points (signed zero point plus 2^(bits-1) = cllm's unsigned zero code) are packed
  like the weight but along the *output* dim, one dense bit stream per group column, into
  the first `ceil(out * bits / 32)` rows; the remaining rows are zero padding.

Why the padded zero point (checked with transformers 5.24.0, compressed-tensors 0.20.1,
torch 2.13): compressed-tensors' own `PackedQuantizationCompressor.compress` writes the
zero point packed *without* padding, int32 `[ceil(out * bits / 32), groups]`, and so
did cllm before (files with that layout are still read here). But transformers' default
(compressed) load builds the model on the meta device (`CompressedTensorsHfQuantizer.
_process_model_before_weight_loading`: `apply_quantization_config`, which creates an int8
`[out, groups]` zero point, then `ModelCompressor.compress_model`), and `compress` on meta
tensors only creates `weight_packed`: it leaves that zero point unpacked. The loader then
rejects the unpadded tensor ("size mismatch"), so such files load only with
`CompressedTensorsConfig(dequantize=True)`. On the first forward the decompression hook
(`PackedQuantizationCompressor.decompress`) calls `unpack_from_int32(zp, bits, (out,
groups), packed_dim=0)`, which needs int32 and reads only the first `out` values of each
column's bit stream. An int32 `[out, groups]` tensor with the packed words on top therefore
matches the parameter's shape and decompresses to the right zero points: the default load
and `dequantize=True` both give logits identical to cllm's dequantization. The cost is
4 bytes per group instead of bits/8 (about +0.9 bit per weight at 4 bits, group 32).
vLLM's compressed-tensors WNA16 scheme allocates `[out // (32 // bits), groups]` for the
zero point and so expects the unpadded layout (read from its source, not tested);
`linear_tensors(..., pad_zero_point=False)` still writes that.

The weight the loader computes is `scale * (q - zp)` with `q`, `zp` signed, i.e.
`scale * (code - zero)` with cllm's unsigned codes: the same numbers, bit for bit.

`torch` is imported lazily, as everywhere in `cllm.formats`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cllm.errors import InputError, UsageError

if TYPE_CHECKING:
    import torch

QUANT_METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
# the loader needs compressed-tensors >= 0.20 for dense 3/5/6/7-bit packing (4 and 8 bits
# are laid out the same in older versions)
REQUIREMENT = "compressed-tensors>=0.20.0"
SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise UsageError(f"{bits}-bit packing is not supported", "Use 1 to 8 bits")


_CHUNK_ROWS = 4096  # rows packed at a time: bounds the int64 temporaries (~40 MB at 576 columns)


def pack_weight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes `[rows, cols]` (0 .. 2^bits-1) into int32 `[rows, ceil(cols*bits/32)]`.

    Each row is a dense little-endian bit stream (element j at bit j*bits), the layout of
    compressed-tensors' `pack_to_int32` with the values already offset by 2^(bits-1).
    """
    import torch

    _check_bits(bits)
    if codes.dim() != 2:
        raise UsageError(f"pack_weight needs a 2-D tensor, got shape {tuple(codes.shape)}")
    rows, cols = codes.shape
    if codes.numel():
        lo, hi = codes.min().item(), codes.max().item()
        if lo < 0 or hi > (1 << bits) - 1:
            raise UsageError(
                f"codes span {lo:g}..{hi:g}, outside the {bits}-bit range 0..{(1 << bits) - 1}"
            )
    words = math.ceil(cols * bits / 32)
    groups = math.ceil(cols / 32)  # 32 values fill exactly `bits` words
    out = torch.empty(rows, groups * bits, dtype=torch.int32)
    for r0 in range(0, rows, _CHUNK_ROWS):
        chunk = codes[r0 : r0 + _CHUNK_ROWS].to(torch.int64).contiguous()
        if groups * 32 != cols:
            chunk = torch.nn.functional.pad(chunk, (0, groups * 32 - cols))
        out[r0 : r0 + _CHUNK_ROWS] = _pack_rows(chunk, bits)
    return out[:, :words].contiguous()


def _pack_rows(v: torch.Tensor, bits: int) -> torch.Tensor:
    """int64 `[rows, 32*g]` values -> int32 `[rows, bits*g]`."""
    import torch

    rows, cols = v.shape
    if sys.byteorder != "little":  # pragma: no cover - reference path, word by word
        g = v.reshape(rows, cols // 32, 32)
        out = torch.zeros(rows, cols // 32, bits, dtype=torch.int64)
        for i in range(32):
            word, off = divmod(i * bits, 32)
            out[:, :, word] |= (g[:, :, i] << off) & 0xFFFFFFFF
            if off + bits > 32:
                out[:, :, word + 1] |= g[:, :, i] >> (32 - off)
        out = torch.where(out >= 1 << 31, out - (1 << 32), out)
        return out.reshape(rows, -1).to(torch.int32)
    # 8 values of `bits` bits are exactly `bits` bytes: gather them in one int64 ...
    g = v.reshape(rows, cols // 8, 8)
    acc = g[:, :, 0].clone(memory_format=torch.contiguous_format)
    for k in range(1, 8):
        acc |= g[:, :, k] << (k * bits)  # disjoint bits; the top one may wrap the sign
    # ... whose low `bits` bytes (little-endian) continue the row's byte stream
    stream = acc.view(torch.uint8).reshape(rows, cols // 8, 8)[:, :, :bits]
    return stream.reshape(rows, cols // 8 * bits).contiguous().view(torch.int32)


def unpack_weight(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of `pack_weight`: unsigned codes, int32 `[rows, in_features]`."""
    import torch

    _check_bits(bits)
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise InputError(
            f"packed weight must be 2-D int32, got {packed.dtype} shape {tuple(packed.shape)}"
        )
    rows, words = packed.shape
    if words != math.ceil(in_features * bits / 32):
        raise InputError(
            f"packed weight has {words} words per row; {in_features} {bits}-bit values need "
            f"{math.ceil(in_features * bits / 32)}"
        )
    groups = math.ceil(in_features / 32)
    out = torch.empty(rows, groups * 32, dtype=torch.int32)
    for r0 in range(0, rows, _CHUNK_ROWS):
        chunk = packed[r0 : r0 + _CHUNK_ROWS]
        if groups * bits != words:
            chunk = torch.nn.functional.pad(chunk, (0, groups * bits - words))
        out[r0 : r0 + _CHUNK_ROWS] = _unpack_rows(chunk.contiguous(), bits)
    return out[:, :in_features].contiguous()


def _unpack_rows(p: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 `[rows, bits*g]` -> int64 `[rows, 32*g]` values."""
    import torch

    rows, words = p.shape
    mask = (1 << bits) - 1
    if sys.byteorder != "little":  # pragma: no cover - reference path, word by word
        w = p.to(torch.int64).reshape(rows, words // bits, bits) & 0xFFFFFFFF
        out = torch.empty(rows, words // bits, 32, dtype=torch.int64)
        for i in range(32):
            word, off = divmod(i * bits, 32)
            val = w[:, :, word] >> off
            if off + bits > 32:
                val = val | (w[:, :, word + 1] << (32 - off))
            out[:, :, i] = val & mask
        return out.reshape(rows, -1)
    n8 = words * 4 // bits  # runs of 8 values (`bits` bytes each)
    stream = p.view(torch.uint8).reshape(rows, n8, bits)
    stream = torch.nn.functional.pad(stream, (0, 8 - bits))
    acc = stream.view(torch.int64).reshape(rows, n8)
    out = torch.empty(rows, n8, 8, dtype=torch.int64)
    for k in range(8):
        out[:, :, k] = (acc >> (k * bits)) & mask
    return out.reshape(rows, n8 * 8)


def linear_tensors(
    prefix: str,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    group_size: int,
    scale_dtype: torch.dtype | None = None,
    pad_zero_point: bool = True,
) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized Linear (`prefix` is e.g. `model.layers.0.mlp.up_proj`).

    `codes` `[out, in]` are unsigned; `scale` `[out, in/group]`; `zero` is None for a
    symmetric grid (whose zero must be 2^(bits-1)) or the unsigned integer zero codes
    `[out, in/group]`. `group_size` -1 means per channel. `scale_dtype` defaults to
    float32; give the model's dtype (bf16/fp16) to match a checkpoint of that dtype.
    `pad_zero_point` pads the packed zero point to `[out, groups]` rows, the shape
    transformers' default load expects (see the module docstring); False writes the
    unpadded `[ceil(out*bits/32), groups]` of compressed-tensors' own compressor.
    """
    import torch

    _check_bits(bits)
    out_f, in_f = codes.shape
    groups = 1 if group_size == -1 else in_f // group_size
    if group_size != -1 and in_f % group_size:
        raise UsageError(
            f"{prefix}: row length {in_f} is not a multiple of the group size {group_size}"
        )
    if tuple(scale.shape) != (out_f, groups):
        raise UsageError(
            f"{prefix}: scale has shape {tuple(scale.shape)}, expected {(out_f, groups)}"
        )
    tensors = {
        f"{prefix}.weight_packed": pack_weight(codes, bits),
        f"{prefix}.weight_scale": scale.to(scale_dtype or torch.float32).contiguous(),
        f"{prefix}.weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
    }
    if zero is not None:
        if tuple(zero.shape) != (out_f, groups):
            raise UsageError(
                f"{prefix}: zero has shape {tuple(zero.shape)}, expected {(out_f, groups)}"
            )
        if not torch.equal(zero, zero.round()):
            raise UsageError(f"{prefix}: zero points must be integers for compressed-tensors")
        # packed along the output dim: [ceil(out*bits/32), groups] ...
        zp = pack_weight(zero.t(), bits).t()
        if pad_zero_point:  # ... in the top rows of an [out, groups] tensor
            zp = torch.cat([zp, zp.new_zeros(out_f - zp.shape[0], groups)])
        tensors[f"{prefix}.weight_zero_point"] = zp.contiguous()
    return tensors


def quantization_config(
    bits: int, group_size: int, symmetric: bool, ignore: list[str]
) -> dict[str, Any]:
    """`quantization_config` for config.json (one config group targeting every Linear)."""
    _check_bits(bits)
    weights: dict[str, Any] = {
        "num_bits": bits,
        "type": "int",
        "symmetric": symmetric,
        "strategy": "channel" if group_size == -1 else "group",
        "group_size": None if group_size == -1 else group_size,
        "dynamic": False,
    }
    return {
        "quant_method": QUANT_METHOD,
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": FORMAT,
            }
        },
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
    }


@dataclass(frozen=True)
class PackedSpec:
    """What cllm reads from a pack-quantized config: one int weight scheme."""

    bits: int
    group_size: int  # -1: per channel
    symmetric: bool


def spec_from_config(config: Mapping[str, Any]) -> PackedSpec:
    """The weight scheme of a config.json (or its `quantization_config`) that cllm can unpack."""
    qc = config.get("quantization_config", config)
    if not isinstance(qc, Mapping) or qc.get("quant_method") != QUANT_METHOD:
        raise InputError("the config has no compressed-tensors quantization_config")
    if qc.get("format") != FORMAT:
        raise InputError(
            f"compressed-tensors format {qc.get('format')!r} is not supported",
            f"cllm reads the {FORMAT} format",
        )
    groups = qc.get("config_groups") or {}
    schemes = [g.get("weights") for g in groups.values() if isinstance(g, Mapping)]
    if len(schemes) != 1 or not isinstance(schemes[0], Mapping):
        raise InputError(f"expected one compressed-tensors config group, found {len(schemes)}")
    w = schemes[0]
    if w.get("type") != "int" or w.get("format", FORMAT) != FORMAT:
        raise InputError(f"compressed-tensors weights of type {w.get('type')!r} are not supported")
    strategy = w.get("strategy")
    if strategy == "channel":
        group_size = -1
    elif strategy == "group" and isinstance(w.get("group_size"), int) and w["group_size"] > 0:
        group_size = w["group_size"]
    else:
        raise InputError(f"compressed-tensors strategy {strategy!r} is not supported")
    bits = w.get("num_bits")
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise InputError(f"compressed-tensors num_bits {bits!r} is not supported")
    return PackedSpec(bits, group_size, bool(w.get("symmetric", True)))


def packed_prefix(name: str) -> str | None:
    """`model.x.weight_packed` -> `model.x` (None for names that are not packed-linear parts)."""
    for suffix in SUFFIXES:
        if name.endswith("." + suffix):
            return name[: -len(suffix) - 1]
    return None


def dequantize_linear(tensors: Mapping[str, torch.Tensor], bits: int) -> torch.Tensor:
    """The dense float32 weight `[out, in]` of one packed Linear.

    `tensors` maps the local names (`weight_packed`, `weight_scale`, `weight_shape` and,
    if asymmetric, `weight_zero_point`) to the checkpoint's tensors.
    """
    codes, scale, zero, group = unpack_linear(tensors, bits)
    g_idx = group_index(tensors.get("weight_g_idx"), codes.shape[1], scale.shape[1])
    if g_idx is not None:  # act-order: column i belongs to group g_idx[i]
        return scale.float()[:, g_idx] * (codes.float() - zero[:, g_idx])
    s = scale.float().repeat_interleave(group, dim=1)
    z = zero.repeat_interleave(group, dim=1)
    return s * (codes.float() - z)


def group_index(g_idx: torch.Tensor | None, in_f: int, groups: int) -> torch.Tensor | None:
    """llm-compressor's `weight_g_idx` (activation-ordered groups) as column -> group, or
    None when absent or unused (all -1: the groups are contiguous)."""
    if g_idx is None:
        return None
    import torch

    idx = g_idx.reshape(-1).to(torch.int64)
    if idx.numel() != in_f:
        raise InputError(f"weight_g_idx has {idx.numel()} entries for {in_f} input columns")
    if bool((idx < 0).all()):
        return None
    if int(idx.min()) < 0 or int(idx.max()) >= groups:
        raise InputError(f"weight_g_idx names groups outside 0..{groups - 1}")
    return idx


def unpack_linear(
    tensors: Mapping[str, torch.Tensor], bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """One packed Linear as stored: (codes [out, in] unsigned, scale [out, groups],
    zero [out, groups] float, columns per group); weight = scale * (code - zero)."""
    import torch

    try:
        packed, scale, shape = (tensors[k] for k in SUFFIXES[:3])
    except KeyError as exc:
        raise InputError(f"packed linear is missing {exc.args[0]}") from exc
    if shape.numel() != 2:
        raise InputError(f"weight_shape must hold 2 values, got {shape.tolist()}")
    out_f, in_f = (int(x) for x in shape.tolist())
    if packed.shape[0] != out_f:
        raise InputError(f"weight_packed has {packed.shape[0]} rows, weight_shape says {out_f}")
    codes = unpack_weight(packed, bits, in_f)
    if scale.dim() != 2 or scale.shape[0] != out_f or scale.shape[1] == 0 or in_f % scale.shape[1]:
        raise InputError(
            f"weight_scale has shape {tuple(scale.shape)}, not [{out_f}, groups of {in_f}]"
        )
    group = in_f // scale.shape[1]
    zp = tensors.get("weight_zero_point")
    if zp is None:
        zero = torch.full((out_f, scale.shape[1]), float(1 << (bits - 1)))
    elif zp.dtype == torch.int8 and tuple(zp.shape) == (out_f, scale.shape[1]):
        # compressed-tensors before 0.10 stored the signed zero points unpacked
        zero = zp.float() + float(1 << (bits - 1))
    else:
        # packed along the output dim, padded to [out, groups] rows (cllm since the
        # transformers default-load fix) or not ([words, groups]: compressed-tensors'
        # compressor, older cllm)
        words = math.ceil(out_f * bits / 32)
        if zp.dim() != 2 or zp.shape[1] != scale.shape[1] or zp.shape[0] not in (words, out_f):
            raise InputError(
                f"weight_zero_point has shape {tuple(zp.shape)}, not packed "
                f"[{words}, {scale.shape[1]}] or padded [{out_f}, {scale.shape[1]}]"
            )
        zero = unpack_weight(zp[:words].t().contiguous(), bits, out_f).t().float()
    return codes, scale, zero, group


def dequantize_checkpoint_linear(
    get: Any, prefix: str, spec: PackedSpec, names: set[str] | None = None
) -> torch.Tensor:
    """Read one packed Linear through `get(name) -> tensor` and return its float32 weight.

    `names` (the checkpoint's tensor names) tells whether a zero point is stored; without
    it the spec's `symmetric` decides.
    """
    return dequantize_linear(_linear_parts(get, prefix, spec, names), spec.bits)


def read_checkpoint_linear(
    get: Any, prefix: str, spec: PackedSpec, names: set[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """One packed Linear's codes, scales, zeros and group size, as `unpack_linear` gives them."""
    return unpack_linear(_linear_parts(get, prefix, spec, names), spec.bits)


def _linear_parts(
    get: Any, prefix: str, spec: PackedSpec, names: set[str] | None
) -> dict[str, torch.Tensor]:
    local = ["weight_packed", "weight_scale", "weight_shape"]
    has_zp = (f"{prefix}.weight_zero_point" in names) if names is not None else not spec.symmetric
    if has_zp:
        local.append("weight_zero_point")
    if names is not None and f"{prefix}.weight_g_idx" in names:
        local.append("weight_g_idx")
    return {k: get(f"{prefix}.{k}") for k in local}


def planned_shapes(
    rows: int,
    cols: int,
    bits: int,
    group_size: int,
    symmetric: bool,
    pad_zero_point: bool = True,
) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shape and safetensors dtype of each stored tensor of one packed Linear, known before
    quantizing, so the writer can lay out the file header and stream the data afterwards."""
    groups = 1 if group_size == -1 else cols // group_size
    out: dict[str, tuple[tuple[int, ...], str]] = {
        "weight_packed": ((rows, -(-cols * bits // 32)), "I32"),
        "weight_scale": ((rows, groups), "F32"),
        "weight_shape": ((2,), "I64"),
    }
    if not symmetric:
        zp_rows = rows if pad_zero_point else -(-rows * bits // 32)
        out["weight_zero_point"] = ((zp_rows, groups), "I32")
    return out
