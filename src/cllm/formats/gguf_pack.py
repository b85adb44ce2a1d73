"""Pack integer codes into llama.cpp's legacy block layouts (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), and back.

A method that optimises on a `GGUFGrid` (RTN, GPTQ, AWQ) ends with, for a weight [rows, cols]:
unsigned codes [rows, cols] and per-block `scale`, `zero` [rows, cols/32] with
`weight = scale * (code - zero)`. `pack_blocks` turns that into the exact bytes llama.cpp
stores (the layout `gguf.quants.quantize` returns), so the GGUF is a standard file; no
re-quantization, no rounding of the codes the method chose.

Block layouts (32 weights per block, all little-endian):

    Q4_0  d:f16                       qs[16]   weight = d * (q - 8)
    Q4_1  d:f16  m:f16                qs[16]   weight = d * q + m
    Q5_0  d:f16         qh:u32        qs[16]   weight = d * (q - 16)
    Q5_1  d:f16  m:f16  qh:u32        qs[16]   weight = d * q + m
    Q8_0  d:f16                       qs:i8[32] weight = d * qs   (code = qs + 127)

`qs[j]` holds element j in its low nibble and element j+16 in its high nibble; bit j of `qh`
is the 5th bit of element j. For the `_1` types the stored min is `m = -zero * scale`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cllm.errors import UsageError

BLOCK = 32

_TYPES_HINT = "Use Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0"
_F16_MAX = float(np.finfo(np.float16).max)
# `m = -zero * scale` recomputed in float32 is off by a few float32 ulps from the fp16 min it
# came from; anything further than this (relative) is a zero that does not encode an fp16 min.
_MIN_RTOL = 2.0**-16
_MIN_ATOL = 2.0**-30


@dataclass(frozen=True)
class BlockSpec:
    bits: int
    has_min: bool
    zero: int | None  # the fixed zero of the "_0" types; None for "_1" (zero = -m / d)
    maxq: int  # largest code
    type_size: int  # bytes per block of 32


SPECS: dict[str, BlockSpec] = {
    "Q4_0": BlockSpec(4, False, 8, 15, 2 + 16),
    "Q4_1": BlockSpec(4, True, None, 15, 2 + 2 + 16),
    "Q5_0": BlockSpec(5, False, 16, 31, 2 + 4 + 16),
    "Q5_1": BlockSpec(5, True, None, 31, 2 + 2 + 4 + 16),
    "Q8_0": BlockSpec(8, False, 127, 254, 2 + 32),
}


def block_spec(qtype: str) -> BlockSpec:
    spec = SPECS.get(qtype)
    if spec is None:
        raise UsageError(f"GGUF type {qtype} has no block packer", _TYPES_HINT)
    return spec


def pack_blocks(
    qtype: str,
    codes: np.ndarray | torch.Tensor,
    scale: np.ndarray | torch.Tensor,
    zero: np.ndarray | torch.Tensor,
    *,
    exact: bool = True,
) -> np.ndarray:
    """llama.cpp's on-disk bytes, uint8 [rows, cols/32 * type_size], for `scale * (codes - zero)`.

    `codes` [rows, cols] are unsigned integers (any integer dtype, or floats holding integers):
    0..15 for 4-bit, 0..31 for 5-bit, 0..254 for Q8_0 (code - 127 is the stored int8).
    `scale`, `zero` are [rows, cols/32]. For Q4_0/Q5_0/Q8_0 `zero` must be 8/16/127.

    With `exact` (the default) `scale` must already be an fp16 value and, for the `_1` types,
    `-zero * scale` must be an fp16 value up to float32 noise, so the file holds exactly the
    weights the caller computed; `exact=False` rounds both to the nearest fp16 instead.
    A `_1` block whose codes are all 0 is stored with d = 0, as llama.cpp stores a constant
    block; its weights (all m) are the same whatever d is.
    """
    spec = block_spec(qtype)
    c = _codes_u8(codes, spec, qtype)
    rows, cols = c.shape
    nb = cols // BLOCK
    s = _params(scale, "scale", rows, nb, qtype)
    z = _params(zero, "zero", rows, nb, qtype)

    cb = c.reshape(rows, nb, BLOCK)
    out = np.empty((rows, nb, spec.type_size), dtype=np.uint8)

    if spec.zero is not None:
        bad = z != spec.zero
        if bad.any():
            r, b = np.argwhere(bad)[0]
            raise UsageError(
                f"{qtype} zero must be {spec.zero} in every block; block {b} of row {r} has {z[r, b]:g}",
                f"{qtype} has no stored min: weight = d * (code - {spec.zero})",
            )
    d16 = _to_f16(s, "scale", qtype, exact, rtol=0.0, atol=0.0)
    if spec.has_min:
        m16 = _to_f16(-z * s, "min (-zero * scale)", qtype, exact, rtol=_MIN_RTOL, atol=_MIN_ATOL)
        # constant block: llama.cpp stores d = 0 there, and with every code 0 d is irrelevant
        d16 = np.where(cb.any(axis=-1), d16, np.float16(0)).astype("<f2")
        out[..., 2:4] = m16.view(np.uint8).reshape(rows, nb, 2)
    out[..., 0:2] = d16.view(np.uint8).reshape(rows, nb, 2)
    _write_codes(out, cb, spec, qtype)
    return out.reshape(rows, nb * spec.type_size)


def _write_codes(out: Any, cb: Any, spec: BlockSpec, qtype: str) -> None:
    """Codes `cb` uint8 [..., 32] into the code bytes of blocks `out` uint8 [..., type_size].

    numpy arrays are viewed as torch tensors (no copy), so `pack_blocks` and
    `quantize_reference` share one packing, done with torch's threads.
    """
    o = torch.from_numpy(out) if isinstance(out, np.ndarray) else out
    if isinstance(cb, np.ndarray):  # a read-only caller array is copied, never written
        cb = torch.from_numpy(cb if cb.flags.writeable else cb.copy())
    c = cb.reshape(-1, BLOCK)
    o = o.reshape(-1, spec.type_size)
    pos = 4 if spec.has_min else 2
    if qtype == "Q8_0":
        o[:, pos:] = c - 127  # wraps: the int8 (code - 127) in two's complement
        return
    if spec.bits == 5:
        # bit j of the little-endian u32 qh is the 5th bit of element j: byte k holds 8k..8k+7
        bits = (c >> 4).reshape(-1, 4, 8) << torch.arange(8, dtype=torch.uint8)
        o[:, pos : pos + 4] = bits.sum(dim=-1, dtype=torch.uint8)
        pos += 4
    o[:, pos:] = (c[:, : BLOCK // 2] & 0x0F) | (c[:, BLOCK // 2 :] << 4)


_JUST_BELOW_HALF = float(np.nextafter(np.float32(0.5), np.float32(0)))


def quantize_reference(qtype: str, x: np.ndarray | torch.Tensor) -> np.ndarray:
    """llama.cpp's reference round-to-nearest of float32 `x` [rows, cols] into `qtype` blocks.

    The same bytes as `gguf.quants.quantize` (and ggml's `quantize_row_*_ref`), computed with
    torch end to end: gguf-py's numpy version runs on one core over small slices and was 60%
    of a Q4_0 conversion of SmolLM2. The arithmetic is the reference's, step for step in
    float32 (scale, its reciprocal, multiply, add, truncate; Q8_0 rounds half away from zero),
    so the golden test against gguf-py holds bit for bit. Raises `NonFiniteError` on NaN or
    infinity, found from the block statistics at no extra pass over the data.
    """
    spec = block_spec(qtype)
    t = torch.as_tensor(x)
    if t.dtype != torch.float32 or t.ndim != 2 or t.shape[1] % BLOCK or t.shape[1] == 0:
        raise UsageError(
            f"{qtype} reference quantization needs float32 [rows, cols] with cols a multiple "
            f"of {BLOCK}, got {t.dtype} {tuple(t.shape)}"
        )
    rows, cols = t.shape
    nb = cols // BLOCK
    blocks = t.reshape(rows * nb, BLOCK)
    out = torch.empty((rows * nb, spec.type_size), dtype=torch.uint8)
    levels = spec.maxq + 1
    if qtype == "Q8_0":
        amax = blocks.abs().amax(dim=-1, keepdim=True)
        _check_finite(amax)
        d = amax / 127
        v = blocks * torch.where(d == 0, 0.0, 1 / d)
        # roundf (half away from zero) for |v| <= 127 in two passes: adding the largest float
        # below 1/2 lands exact halves on the next integer and nothing else (tested densely
        # around every half-integer against gguf-py's np_roundf)
        q = torch.copysign(torch.full((), _JUST_BELOW_HALF), v).add_(v).trunc_()
        out[:, 0:2] = d.half().view(torch.uint8)
        out[:, 2:] = q.to(torch.int8).view(torch.uint8)
        return out.reshape(rows, nb * spec.type_size).numpy()
    if spec.has_min:
        m = blocks.amin(dim=-1, keepdim=True)
        hi = blocks.amax(dim=-1, keepdim=True)
        _check_finite(m, hi)
        d = (hi - m) / (levels - 1)
        q = (blocks - m).mul_(torch.where(d == 0, 0.0, 1 / d)).add_(0.5)
        out[:, 2:4] = m.half().view(torch.uint8)
    else:
        d = _signed_absmax(blocks) / -(levels // 2)
        q = (blocks * torch.where(d == 0, 0.0, 1 / d)).add_(levels // 2 + 0.5)
    # q >= 0 here, so the cast's truncation toward zero is the reference's trunc
    cb = q.clamp_(0, levels - 1).to(torch.uint8)
    out[:, 0:2] = d.half().view(torch.uint8)
    _write_codes(out, cb, spec, qtype)
    return out.reshape(rows, nb * spec.type_size).numpy()


class NonFiniteError(ValueError):
    """The input holds NaN or infinity (a block's max/min would be non-finite)."""


def _check_finite(*stats: torch.Tensor) -> None:
    # max/min propagate NaN and infinity, so per-block stats reveal any non-finite weight
    if not all(bool(torch.isfinite(t).all()) for t in stats):
        raise NonFiniteError("non-finite values")


def _signed_absmax(blocks: torch.Tensor) -> torch.Tensor:
    """The first element of largest magnitude in each row, as the reference's argmax finds it.

    max/min decide every row except ties (+a and -a both present, or all zeros, where the
    sign of the first such element matters); only those rows pay for an argmax.
    """
    hi = blocks.amax(dim=-1, keepdim=True)
    lo = blocks.amin(dim=-1, keepdim=True)
    _check_finite(hi, lo)
    out = torch.where(hi > -lo, hi, lo)
    tie = (hi == -lo).squeeze(-1)
    if bool(tie.any()):
        sub = blocks[tie]
        out[tie] = torch.gather(sub, -1, sub.abs().argmax(dim=-1, keepdim=True))
    return out


def unpack_blocks(
    qtype: str, data: np.ndarray | bytes | bytearray | memoryview
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The inverse of `pack_blocks`: (codes uint8 [rows, cols], scale, zero float32 [rows, cols/32]).

    `data` is uint8 [rows, cols/32 * type_size] (1-D is read as one row). `scale * (codes - zero)`
    are the weights llama.cpp decodes, up to float32 rounding for the `_1` types (exact for the
    others). A `_1` block stored with d = 0 decodes to all m; it comes back as scale 1,
    zero -m, codes 0 (`GGUFGrid`'s convention for a constant block). A Q8_0 byte of -128, which
    llama.cpp's quantizer never writes, comes back as code 255.
    """
    spec = block_spec(qtype)
    raw = np.asarray(data) if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
    if raw.dtype != np.uint8:
        raise UsageError(f"{qtype} data must be uint8 bytes, got {raw.dtype}")
    if raw.ndim == 1:
        raw = raw.reshape(1, -1)
    if raw.ndim != 2:
        raise UsageError(f"{qtype} data must be 2-D [rows, bytes], got shape {tuple(raw.shape)}")
    rows, nbytes = raw.shape
    if nbytes % spec.type_size:
        raise UsageError(
            f"{qtype} row of {nbytes} bytes is not a whole number of {spec.type_size}-byte blocks"
        )
    nb = nbytes // spec.type_size
    b = raw.reshape(rows, nb, spec.type_size)

    d = _f16_at(b, 0)
    pos = 2
    if qtype == "Q8_0":
        codes = b[..., pos:] + np.uint8(127)  # wraps back from two's complement
    else:
        qh = None
        if spec.has_min:
            pos += 2
        if spec.bits == 5:
            qh = np.unpackbits(b[..., pos : pos + 4], axis=-1, bitorder="little")
            pos += 4
        qs = b[..., pos:]
        codes = np.empty((rows, nb, BLOCK), dtype=np.uint8)
        codes[..., : BLOCK // 2] = qs & np.uint8(0x0F)
        codes[..., BLOCK // 2 :] = qs >> np.uint8(4)
        if qh is not None:
            codes |= qh << np.uint8(4)

    if spec.has_min:
        m = _f16_at(b, 2).astype(np.float64)
        dd = d.astype(np.float64)
        const = dd == 0
        with np.errstate(divide="ignore", invalid="ignore"):
            zero = np.where(const, -m, -m / np.where(const, 1.0, dd)).astype(np.float32)
        scale = np.where(const, np.float32(1), d).astype(np.float32)
        if const.any():
            codes[const] = 0
    else:
        scale = d.astype(np.float32)
        zero = np.full((rows, nb), spec.zero, dtype=np.float32)
    return codes.reshape(rows, nb * BLOCK), scale, zero


# --- helpers ------------------------------------------------------------------------------


def _to_numpy(x: Any, name: str, qtype: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        return t.numpy()
    try:
        return np.asarray(x)
    except Exception as e:  # pragma: no cover - exotic inputs
        raise UsageError(f"{qtype} {name} is not an array: {e}") from e


def _codes_u8(codes: Any, spec: BlockSpec, qtype: str) -> np.ndarray:
    c = _to_numpy(codes, "codes", qtype)
    if c.ndim != 2:
        raise UsageError(f"{qtype} codes must be 2-D [rows, cols], got shape {tuple(c.shape)}")
    rows, cols = c.shape
    if cols == 0 or cols % BLOCK:
        raise UsageError(
            f"{qtype} row length {cols} is not a multiple of the block size {BLOCK}",
            "llama.cpp's legacy types quantize rows in blocks of 32; keep such tensors in F16/F32",
        )
    kind = c.dtype.kind
    if kind not in "biuf":
        raise UsageError(f"{qtype} codes must be integers, got dtype {c.dtype}")
    if c.size == 0:
        return c.astype(np.uint8)
    lo, hi = c.min(), c.max()
    if kind == "f" and not (np.isfinite(lo) and np.isfinite(hi)):
        raise UsageError(f"{qtype} codes contain NaN or infinity")
    if lo < 0 or hi > spec.maxq:
        raise UsageError(
            f"{qtype} codes must be in 0..{spec.maxq}, got {lo:g}..{hi:g}",
            f"{qtype} codes are unsigned; weight = scale * (code - zero)",
        )
    if c.dtype == np.uint8:
        return c
    out = c.astype(np.uint8)
    if kind == "f" and not np.array_equal(out, c):
        raise UsageError(f"{qtype} codes must be whole numbers; some have a fractional part")
    return out


def _params(x: Any, name: str, rows: int, nb: int, qtype: str) -> np.ndarray:
    a = _to_numpy(x, name, qtype)
    if a.dtype.kind not in "biuf":
        raise UsageError(f"{qtype} {name} must be numeric, got dtype {a.dtype}")
    if a.shape != (rows, nb):
        raise UsageError(
            f"{qtype} {name} must have shape {(rows, nb)} (one per block of 32), got {tuple(a.shape)}"
        )
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise UsageError(f"{qtype} {name} contains NaN or infinity")
    return a


def _to_f16(
    v: np.ndarray, name: str, qtype: str, exact: bool, *, rtol: float, atol: float
) -> np.ndarray:
    """Little-endian fp16 of `v` (float64); with `exact`, `v` must already be fp16 (within tol)."""
    if np.abs(v).max(initial=0.0) > _F16_MAX:
        raise UsageError(f"{qtype} {name} overflows fp16 (|value| > {_F16_MAX:g})")
    h = v.astype("<f2")
    if exact:
        err = np.abs(h.astype(np.float64) - v)
        bad = err > rtol * np.abs(v) + atol
        if bad.any():
            r, b = np.argwhere(bad)[0]
            raise UsageError(
                f"{qtype} {name} of block {b} in row {r} is {v[r, b]!r}, not an fp16 value",
                "Round the grid to fp16 before choosing codes (GGUFGrid.fit does), "
                "or pass exact=False to round here",
            )
    return h


def _f16_at(b: np.ndarray, pos: int) -> np.ndarray:
    """The fp16 at byte `pos` of every block of `b` [rows, nb, type_size], as float32 [rows, nb]."""
    return np.ascontiguousarray(b[..., pos : pos + 2]).view("<f2")[..., 0].astype(np.float32)
