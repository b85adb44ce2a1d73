"""Quantized checkpoints written by other tools, read as dense float weights one Linear at a
time: GPTQ (AutoGPTQ, GPTQModel, optimum; v1 and v2 zero points, act-order), AWQ GEMM
(AutoAWQ) and AutoRound's formats, which are one of those two layouts.

Per quantized Linear `<p>` these checkpoints hold `<p>.qweight`, `<p>.qzeros`, `<p>.scales`,
optionally `<p>.g_idx` and `<p>.bias`; everything else (embeddings, norms, lm_head) is float.

- GPTQ: `qweight` int32 `[in * bits / 32, out]` and `qzeros` int32 `[groups, out * bits / 32]`
  are little-endian bit streams along their first and last axis respectively (value i at
  bit i * bits of the concatenated words; for 3 bits values straddle words). `scales`
  `[groups, out]`; `g_idx[i]` is input column i's group (act-order permutes it), else
  i // group_size. v1 (every writer's default) stores zero - 1 for historical reasons; a
  stored -1 (an asymmetric zero of 0) borrows from the next field, which adding 1 to every
  field of the whole word (with carries) undoes, as GPTQModel's loader does. v2
  (`format`/`checkpoint_format` `gptq_v2`) stores the zero itself.
- AWQ GEMM: `qweight` int32 `[in, out / 8]`, `qzeros` int32 `[groups, out / 8]`, 4 bits;
  nibble k of a word holds output column 8c + [0, 2, 4, 6, 1, 3, 5, 7][k]; zeros as stored;
  groups are i // group_size.

weight[o, i] = scale[g(i), o] * (q[i, o] - zero[g(i), o]), computed in float32 (the
libraries round it to the scale's dtype; this is the unrounded value).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cllm.errors import InputError

if TYPE_CHECKING:
    import torch

AWQ_REVERSE = (0, 4, 1, 5, 2, 6, 3, 7)  # output column j of 8 is in nibble AWQ_REVERSE[j]
PARTS = ("qweight", "qzeros", "scales", "g_idx")


@dataclass(frozen=True)
class ForeignSpec:
    layout: str  # gptq | awq
    bits: int
    group_size: int  # -1: one group (per channel)
    zero_offset: int  # what was subtracted from the zero before packing (GPTQ v1: 1)
    label: str  # for `cllm info` and messages

    @property
    def dtype(self) -> str:
        """How `cllm info` names the storage type of these tensors."""
        return f"{self.layout.upper()}_INT{self.bits}"


def spec_from_config(config: Mapping[str, Any]) -> ForeignSpec | None:
    """The layout a config's `quantization_config` declares; None when it is not one of
    these tools' formats; InputError for a variant of theirs cllm cannot read."""
    qc = config.get("quantization_config")
    if not isinstance(qc, Mapping):
        return None
    method = str(qc.get("quant_method") or qc.get("method") or "").lower()
    if method == "gptq":
        fmt = str(qc.get("format") or qc.get("checkpoint_format") or "gptq").lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise _unsupported(f"GPTQ format {fmt!r}", "gptq and gptq_v2")
        _check_pack_dtype(qc)
        bits = _bits(qc, (2, 3, 4, 8))
        offset = 1 if fmt == "gptq" else 0
        return ForeignSpec(
            "gptq", bits, _group(qc), offset, f"GPTQ {'v1' if offset else 'v2'} {bits}-bit"
        )
    if method == "awq":
        version = str(qc.get("version") or "gemm").lower()
        if version != "gemm":
            raise _unsupported(f"AWQ version {version!r}", "the gemm layout")
        bits = _bits(qc, (4,))
        return ForeignSpec("awq", bits, _group(qc), 0, "AWQ GEMM 4-bit")
    if method in ("auto-round", "intel/auto-round"):
        packing = str(qc.get("packing_format") or qc.get("backend") or "auto_round").lower()
        if str(qc.get("data_type", "int")).lower() != "int" or int(qc.get("act_bits", 16)) < 16:
            raise _unsupported("AutoRound with non-integer or quantized activations", "int weights")
        if "rotation_config" in qc or "spinquant_config" in qc:
            raise _unsupported("AutoRound with rotations", "plain int weights")
        if "awq" in packing:
            return ForeignSpec("awq", _bits(qc, (4,)), _group(qc), 0, f"AutoRound ({packing})")
        bits = _bits(qc, (2, 3, 4, 8))
        v1 = "gptq" in packing and "gptqmodel" not in packing
        return ForeignSpec("gptq", bits, _group(qc), int(v1), f"AutoRound ({packing})")
    return None


def _unsupported(what: str, supported: str) -> InputError:
    return InputError(
        f"{what} is not supported", f"cllm reads {supported}; dequantize it with its own tool"
    )


def _check_pack_dtype(qc: Mapping[str, Any]) -> None:
    pack = str(qc.get("pack_dtype") or "int32").replace("torch.", "")
    if pack != "int32":
        raise _unsupported(f"GPTQ pack_dtype {pack}", "int32 packing")


def _bits(qc: Mapping[str, Any], allowed: tuple[int, ...]) -> int:
    raw = qc.get("bits", qc.get("w_bit"))
    try:
        bits = int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise _unsupported(f"bits {raw!r}", f"{'/'.join(map(str, allowed))} bits") from None
    if bits not in allowed:
        raise _unsupported(
            f"{bits}-bit weights in this layout", f"{'/'.join(map(str, allowed))} bits"
        )
    return bits


def _group(qc: Mapping[str, Any]) -> int:
    raw = qc.get("group_size", qc.get("q_group_size", -1))
    try:
        return int(raw)
    except (TypeError, ValueError):
        return -1


def unpack_stream(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Values 0..count-1 of the little-endian bit stream along the last axis of the words
    (value i at bit i * bits), as int64: the stream compressed-tensors rows use too."""
    import torch

    from cllm.formats.compressed_tensors import unpack_weight

    w = words.to(torch.int64) & 0xFFFFFFFF
    w = torch.where(w >= 1 << 31, w - (1 << 32), w).to(torch.int32)  # as stored: int32 words
    if w.shape[-1] * 32 < count * bits:
        raise InputError(f"packed tensor holds {w.shape[-1]} words, too few for {count} values")
    w = w[..., : -(-count * bits // 32)]
    return unpack_weight(w.reshape(-1, w.shape[-1]).contiguous(), bits, count).to(torch.int64)


def _v1_zero_fix(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Undo `zero - 1` on whole words (with carries), as the writers' borrows left them."""
    import torch

    if bits == 3:
        return qzeros  # fields straddle words: fixed per field after unpacking
    const = sum(1 << (k * bits) for k in range(32 // bits))
    w = (qzeros.to(torch.int64) & 0xFFFFFFFF) + const
    return w & 0xFFFFFFFF


def dequantize(parts: Mapping[str, torch.Tensor], spec: ForeignSpec) -> torch.Tensor:
    """The float32 `[out, in]` weight of one Linear from its stored parts."""
    import torch

    try:
        qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
    except KeyError as exc:
        raise InputError(f"quantized linear is missing {exc.args[0]}") from exc
    if scales.dim() != 2:
        raise InputError(f"scales has shape {tuple(scales.shape)}, not [groups, out]")
    groups, out_f = int(scales.shape[0]), int(scales.shape[1])
    bits = spec.bits
    if spec.layout == "awq":
        in_f = int(qweight.shape[0])
        if qweight.shape[1] * 8 != out_f or qzeros.shape != (groups, out_f // 8):
            raise InputError(
                f"AWQ tensors do not fit together: qweight {tuple(qweight.shape)}, "
                f"qzeros {tuple(qzeros.shape)}, scales {tuple(scales.shape)}"
            )
        order = torch.tensor(AWQ_REVERSE)

        def awq_unpack(t: torch.Tensor) -> torch.Tensor:
            nat = unpack_stream(t, 4, t.shape[1] * 8)
            return nat.reshape(t.shape[0], -1, 8)[:, :, order].reshape(t.shape[0], -1)

        q = awq_unpack(qweight)  # [in, out]
        z = awq_unpack(qzeros)  # [groups, out]
        group_of = torch.arange(in_f) // _group_width(in_f, groups, spec.group_size)
    else:
        in_f = qweight.shape[0] * 32 // bits
        if qweight.shape[1] != out_f or qzeros.shape[0] != groups:
            raise InputError(
                f"GPTQ tensors do not fit together: qweight {tuple(qweight.shape)}, "
                f"qzeros {tuple(qzeros.shape)}, scales {tuple(scales.shape)}"
            )
        q = unpack_stream(qweight.t(), bits, in_f).t()  # [in, out]
        packed_z = _v1_zero_fix(qzeros, bits) if spec.zero_offset else qzeros
        z = unpack_stream(packed_z, bits, out_f)
        if spec.zero_offset and bits == 3:
            z = (z + 1) & 7
        g_idx = parts.get("g_idx")
        if g_idx is not None:
            if g_idx.numel() != in_f:
                raise InputError(f"g_idx has {g_idx.numel()} entries for {in_f} input columns")
            group_of = g_idx.to(torch.int64).reshape(-1)
            if int(group_of.min()) < 0 or int(group_of.max()) >= groups:
                raise InputError(f"g_idx names groups outside 0..{groups - 1}")
        else:
            group_of = torch.arange(in_f) // _group_width(in_f, groups, spec.group_size)
    s = scales.float()[group_of]  # [in, out]
    w = s * (q - z[group_of]).float()
    return w.t().contiguous()


def _group_width(in_f: int, groups: int, configured: int) -> int:
    width = configured if configured > 0 else in_f
    if math.ceil(in_f / width) != groups:
        width = math.ceil(in_f / groups)
        if math.ceil(in_f / width) != groups:
            raise InputError(f"{groups} groups do not split {in_f} input columns")
    return width


def linear_shape(parts_shapes: Mapping[str, tuple[int, ...]], spec: ForeignSpec) -> tuple[int, int]:
    """(out, in) of a Linear from its parts' shapes, before reading any data."""
    qw, sc = parts_shapes["qweight"], parts_shapes["scales"]
    if len(qw) != 2 or len(sc) != 2:
        raise InputError("qweight and scales must be 2-D")
    if spec.layout == "awq":
        return int(sc[1]), int(qw[0])
    return int(sc[1]), int(qw[0]) * 32 // spec.bits
