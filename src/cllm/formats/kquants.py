"""llama.cpp's K-quant blocks (Q2_K ... Q6_K) in torch, byte for byte as llama.cpp's reference
quantizers (`quantize_row_qN_K_ref` in ggml-quants.c) write them when no importance matrix
is given, so that GPTQ and AWQ can work on the K grids and still write standard blocks.

Why the care: the reference searches scales with float32 sums accumulated in index order,
rounds with `nearest_int` (round half to even, as `torch.round`) and stores scales as fp16
(round to nearest even, as `Tensor.half()`), and takes one correctly rounded square root,
which torch's vectorised float32 sqrt is not always. x86-64 builds of ggml compile this file
without FMA or reassociation, so every product and sum here is one float32 operation in
the C order, over loops of 16 or 32 positions vectorised across all sub-blocks; `torch.sum`
(pairwise) or fused multiply-adds would differ in the last bit and, at ties, in a code.

A 256-value super-block has 16 sub-blocks of 16 (Q2_K, Q3_K, Q6_K) or 8 of 32 (Q4_K,
Q5_K). Layouts (ggml-common.h): Q2_K scales[16] qs[64] d dmin (84 bytes); Q3_K hmask[32]
qs[64] scales[12] d (110); Q4_K d dmin scales[12] qs[128] (144); Q5_K d dmin scales[12]
qh[32] qs[128] (176); Q6_K ql[128] qh[64] scales[16] d (210).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

QK_K = 256
BLOCK_BYTES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
GROUP_MAX_EPS = 1e-15


def _rnd(x: torch.Tensor) -> torch.Tensor:
    """nearest_int: adds 1.5 * 2^23 in float32, i.e. round half to even (as a float)."""
    import torch

    return torch.round(x)


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def _clamp(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    import torch

    return torch.clamp(x, lo, hi)


def make_qkx2(
    x: torch.Tensor,
    w: torch.Tensor,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_qkx2_quants over rows of x [N, n]: (scale [N], the_min [N], codes [N, n])."""
    import torch

    f32 = torch.float32
    n = x.shape[1]
    x = x.t().contiguous()  # position-major: each step below reads one contiguous row
    w = w.t().contiguous()
    mn = x[0].clone()
    mx = x[0].clone()
    sum_w = w[0].clone()
    sum_x = sum_w * x[0]
    for i in range(1, n):
        xi = x[i]
        mn = torch.where(xi < mn, xi, mn)
        mx = torch.where(xi > mx, xi, mx)
        sum_w = sum_w + w[i]
        sum_x = sum_x + w[i] * xi
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    flat = mx == mn
    rng = torch.where(flat, torch.ones_like(mx), mx - mn)
    iscale = torch.tensor(float(nmax), dtype=f32) / rng
    scale = 1 / iscale
    L = _clamp(_rnd(iscale * (x - mn)), 0, nmax)

    def error(sc: torch.Tensor, m: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(sc)
        for i in range(n):
            diff = sc * codes[i] + m - x[i]
            diff = diff.abs() if use_mad else diff * diff
            total = total + w[i] * diff
        return total

    best = error(scale, mn, L)
    for step in range(nstep + 1):
        # `min` moves when a step wins, and later steps measure from it, as in C
        rng = torch.where(flat, torch.ones_like(mx), mx - mn)
        num = torch.tensor(rmin, dtype=f32) + torch.tensor(rdelta, dtype=f32) * float(step)
        iscale = (num + float(nmax)) / rng
        aux = _clamp(_rnd(iscale * (x - mn)), 0, nmax)
        sum_l = torch.zeros_like(mn)
        sum_l2 = torch.zeros_like(mn)
        sum_xl = torch.zeros_like(mn)
        for i in range(n):
            wl = w[i] * aux[i]
            sum_l = sum_l + wl
            sum_l2 = sum_l2 + wl * aux[i]
            sum_xl = sum_xl + wl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        safe_d = torch.where(ok, D, torch.ones_like(D))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_d
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_d
        pos = this_min > 0
        safe_l2 = torch.where(sum_l2 != 0, sum_l2, torch.ones_like(sum_l2))
        this_scale = torch.where(pos, sum_xl / safe_l2, this_scale)
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        cur = error(this_scale, this_min, aux)
        better = ok & (cur < best) & ~flat
        L = torch.where(better, aux, L)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    L = torch.where(flat, torch.zeros_like(L), L)
    return scale, -mn, L.t()


def _signed_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(amax, the signed value first reaching it) per row, with C's strict `>` update."""
    import torch

    amax = torch.zeros_like(x[:, 0])
    mx = torch.zeros_like(x[:, 0])
    for i in range(x.shape[1]):
        ax = x[:, i].abs()
        upd = ax > amax
        amax = torch.where(upd, ax, amax)
        mx = torch.where(upd, x[:, i], mx)
    return amax, mx


def make_q3(x: torch.Tensor, nmax: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """make_q3_quants(n, nmax, x, L, do_rmse=true): (scale [N], codes [N, n] in 0..2nmax-1)."""
    import torch

    n = x.shape[1]
    amax, mx = _signed_absmax(x)
    zero = amax < GROUP_MAX_EPS
    safe = torch.where(zero, torch.ones_like(mx), mx)
    iscale = float(-nmax) / safe
    L = _clamp(_rnd(iscale[:, None] * x), -nmax, nmax - 1)
    sumlx = torch.zeros_like(mx)
    suml2 = torch.zeros_like(mx)
    for i in range(n):
        wv = x[:, i] * x[:, i]
        sumlx = sumlx + wv * x[:, i] * L[:, i]
        suml2 = suml2 + wv * L[:, i] * L[:, i]
    for _ in range(5):
        changed = torch.zeros_like(zero)
        for i in range(n):
            xi = x[:, i]
            wv = xi * xi
            slx = sumlx - wv * xi * L[:, i]
            live = slx > 0
            if not bool(live.any()):
                continue
            sl2 = suml2 - wv * L[:, i] * L[:, i]
            safe_slx = torch.where(live, slx, torch.ones_like(slx))
            new_l = _clamp(_rnd(xi * sl2 / safe_slx), -nmax, nmax - 1)
            diff = live & (new_l != L[:, i])
            slx2 = slx + wv * xi * new_l
            sl22 = sl2 + wv * new_l * new_l
            take = diff & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[:, i] = torch.where(take, new_l, L[:, i])
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
            changed = changed | take
        if not bool(changed.any()):
            break
    safe_l2 = torch.where(suml2 > 0, suml2, torch.ones_like(suml2))
    scale = torch.where(suml2 > 0, sumlx / safe_l2, torch.zeros_like(sumlx))
    L = L + nmax
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    L = torch.where(zero[:, None], torch.zeros_like(L), L)
    return scale, L


def make_qx(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, NULL): weights x², codes in 0..2nmax-1."""
    import torch

    n = x.shape[1]
    amax, mx = _signed_absmax(x)
    zero = amax < GROUP_MAX_EPS
    safe = torch.where(zero, torch.ones_like(mx), mx)
    wts = [x[:, i] * x[:, i] for i in range(n)]

    def sums(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        codes = _clamp(_rnd(iscale[:, None] * x), -nmax, nmax - 1)
        slx = torch.zeros_like(mx)
        sl2 = torch.zeros_like(mx)
        for i in range(n):
            slx = slx + wts[i] * x[:, i] * codes[:, i]
            sl2 = sl2 + wts[i] * codes[:, i] * codes[:, i]
        return codes, slx, sl2

    L, sumlx, suml2 = sums(float(-nmax) / safe)
    safe_l2 = torch.where(suml2 != 0, suml2, torch.ones_like(suml2))
    scale = torch.where(suml2 != 0, sumlx / safe_l2, torch.zeros_like(sumlx))
    best = scale * sumlx
    tenth = torch.tensor(0.1, dtype=torch.float32)
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(float(nmax) + tenth * float(step)) / safe
        codes, slx, sl2 = sums(iscale)
        safe2 = torch.where(sl2 > 0, sl2, torch.ones_like(sl2))
        take = (sl2 > 0) & (slx * slx > best * sl2)
        L = torch.where(take[:, None], codes, L)
        scale = torch.where(take, slx / safe2, scale)
        best = torch.where(take, scale * slx, best)
    L = L + nmax
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    L = torch.where(zero[:, None], torch.zeros_like(L), L)
    return scale, L


def _seq_sum_sq(x: torch.Tensor) -> torch.Tensor:
    import torch

    total = torch.zeros_like(x[:, 0])
    for i in range(x.shape[1]):
        total = total + x[:, i] * x[:, i]
    return total


def _pack_scale_min_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """6-bit scales and mins of 8 sub-blocks [nb, 8] into the 12 bytes Q4_K/Q5_K use."""
    import torch

    out = torch.zeros(ls.shape[0], 12, dtype=torch.int64)
    out[:, 0:4] = ls[:, 0:4]
    out[:, 4:8] = lm[:, 0:4]
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    out[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    out[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    return out


def _interleave_2bit(L: torch.Tensor) -> torch.Tensor:
    """qs for Q2_K/Q3_K: per 128 values, byte l holds values l, l+32, l+64, l+96 (2 bits each)."""
    v = L.reshape(L.shape[0], 2, 4, 32)
    qs = v[:, :, 0] | (v[:, :, 1] << 2) | (v[:, :, 2] << 4) | (v[:, :, 3] << 6)
    return qs.reshape(L.shape[0], 64)


def _f16_bytes(d: torch.Tensor) -> torch.Tensor:
    import torch

    raw = d.half().view(torch.int16).to(torch.int64) & 0xFFFF
    return torch.stack([raw & 0xFF, raw >> 8], dim=1)


def _running_max(v: torch.Tensor) -> torch.Tensor:
    """max over rows starting from 0 with strict `>` (so negatives give 0)."""
    import torch

    best = torch.zeros_like(v[:, 0])
    for j in range(v.shape[1]):
        best = torch.where(v[:, j] > best, v[:, j], best)
    return best


# per type: sub-block width, code range of the requantization, and whether a sub-block's
# value is d_j * q - m_j (with a min) or d_j * (q - offset) (symmetric)
SUB = {"Q2_K": 16, "Q3_K": 16, "Q4_K": 32, "Q5_K": 32, "Q6_K": 16}
CODES = {"Q2_K": (0, 3), "Q3_K": (-4, 3), "Q4_K": (0, 15), "Q5_K": (0, 31), "Q6_K": (-32, 31)}
HAS_MIN = {"Q2_K": True, "Q3_K": False, "Q4_K": True, "Q5_K": True, "Q6_K": False}


@dataclass
class KFit:
    """One K type's parameters for blocks of 256 values, as the reference derives them:
    fp16 super-block scale `d` (and `dmin`), the integer sub-block scale codes `sc` (and
    min codes `mc`), and the codes the sub-block search produced (`helper`), which the
    reference keeps where a sub-block's effective scale is 0."""

    qtype: str
    d: torch.Tensor  # [nb] float32 holding fp16 values
    sc: torch.Tensor  # [nb, n_sub] int64 (Q3_K: 0..63 stored; Q6_K: signed int8 values)
    helper: torch.Tensor  # [nb, 256] int64 codes (already offset, as stored)
    dmin: torch.Tensor | None = None
    mc: torch.Tensor | None = None

    def steps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(d_j, m_j) per sub-block, computed as llama.cpp's dequantizer does: a value is
        d_j * q - m_j (types with a min) or d_j * (q - offset)."""
        import torch

        if self.qtype == "Q3_K":
            dj = self.d[:, None] * (self.sc - 32).float()
        else:
            dj = self.d[:, None] * self.sc.float()
        if self.dmin is None or self.mc is None:
            return dj, torch.zeros_like(dj)
        return dj, self.dmin[:, None] * self.mc.float()


def fit_blocks(qtype: str, x: torch.Tensor) -> KFit:
    """The reference's parameters for x [nb, 256] float32."""
    return _FITS[qtype](x)


def requantize(fit: KFit, x: torch.Tensor) -> torch.Tensor:
    """The reference's final codes [nb, 256]: each value rounded on its sub-block's step,
    except in sub-blocks whose step is 0, which keep the search's codes."""
    import torch

    nb = x.shape[0]
    sub = SUB[fit.qtype]
    lo, hi = CODES[fit.qtype]
    dj, mj = fit.steps()
    live = dj != 0
    safe = torch.where(live, dj, torch.ones_like(dj))
    xs = x.reshape(nb, -1, sub)
    if HAS_MIN[fit.qtype]:
        q = _clamp(_rnd((xs + mj[..., None]) / safe[..., None]), lo, hi)
    else:
        q = _clamp(_rnd(xs / safe[..., None]), lo, hi) - lo
    q = q.to(torch.int64)
    return torch.where(live[..., None], q, fit.helper.reshape(nb, -1, sub)).reshape(nb, 256)


def pack_blocks(fit: KFit, codes: torch.Tensor) -> np.ndarray:
    """Blocks as llama.cpp stores them, from parameters and codes [nb, 256] (as stored)."""
    return _PACKERS[fit.qtype](fit, codes.to(__import__("torch").int64)).numpy()


def quantize_blocks(qtype: str, x: torch.Tensor) -> np.ndarray:
    """x [nb, 256] float32 -> uint8 [nb, block bytes], as quantize_row_<qtype>_ref."""
    fit = fit_blocks(qtype, x)
    return pack_blocks(fit, requantize(fit, x))


def _fit_q2(x: torch.Tensor) -> KFit:
    import torch

    nb = x.shape[0]
    sub = x.reshape(nb * 16, 16)
    scales, mins, L = make_qkx2(sub, sub.abs(), 3, -0.5, 0.1, 15, True)
    scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
    max_scale = _running_max(scales)
    max_min = _running_max(mins)
    fifteen = torch.tensor(15.0)
    has_s = max_scale > 0
    iscale = torch.where(has_s, fifteen / torch.where(has_s, max_scale, fifteen), 0 * fifteen)
    sc = torch.where(has_s[:, None], _rnd(iscale[:, None] * scales), torch.zeros_like(scales))
    d = _f16(torch.where(has_s, max_scale / fifteen, torch.zeros_like(max_scale)))
    has_m = max_min > 0
    imin = torch.where(has_m, fifteen / torch.where(has_m, max_min, fifteen), 0 * fifteen)
    mc = torch.where(has_m[:, None], _rnd(imin[:, None] * mins), torch.zeros_like(mins))
    dmin = _f16(torch.where(has_m, max_min / fifteen, torch.zeros_like(max_min)))
    # the byte keeps sc & 0xF and mc << 4 (mod 256); decode them back the same way
    byte = (sc.to(torch.int64) & 0xFF) | ((mc.to(torch.int64) << 4) & 0xFF)
    return KFit("Q2_K", d, byte & 0xF, L.reshape(nb, 256).to(torch.int64), dmin, byte >> 4)


def _pack_q2(fit: KFit, L: torch.Tensor) -> torch.Tensor:
    import torch

    assert fit.mc is not None and fit.dmin is not None
    byte = fit.sc | (fit.mc << 4)
    out = torch.cat([byte, _interleave_2bit(L), _f16_bytes(fit.d), _f16_bytes(fit.dmin)], dim=1)
    return out.to(torch.uint8)


def _signed_sub_scales(
    x: torch.Tensor, make: Any, nmax: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q3_K and Q6_K: the signed scale of each 16-value sub-block, its codes, and the
    largest |scale| with the signed scale that reaches it first."""
    nb = x.shape[0]
    scales, L = make(x.reshape(nb * 16, 16), nmax)
    scales = scales.reshape(nb, 16)
    amax, max_scale = _signed_absmax(scales)
    return scales, L.reshape(nb, 256), amax, max_scale


def _fit_q3(x: torch.Tensor) -> KFit:
    import torch

    scales, L, _amax, max_scale = _signed_sub_scales(x, make_q3, 4)
    has = max_scale != 0
    safe_m = torch.where(has, max_scale, torch.ones_like(max_scale))
    iscale = torch.where(has, -32.0 / safe_m, torch.zeros_like(max_scale))
    l6 = _clamp(_rnd(iscale[:, None] * scales), -32, 31).to(torch.int64) + 32
    l6 = torch.where(has[:, None], l6, torch.zeros_like(l6))
    safe_i = torch.where(has, iscale, torch.ones_like(iscale))
    d = _f16(torch.where(has, 1 / safe_i, torch.zeros_like(iscale)))
    return KFit("Q3_K", d, l6, L.to(torch.int64))


def _pack_q3(fit: KFit, L: torch.Tensor) -> torch.Tensor:
    import torch

    nb = L.shape[0]
    l6 = fit.sc
    packed = torch.zeros(nb, 12, dtype=torch.int64)
    packed[:, 0:8] = l6[:, 0:8] & 0xF
    packed[:, 0:8] |= (l6[:, 8:16] & 0xF) << 4
    high = l6 >> 4
    for j in range(16):
        packed[:, 8 + j % 4] |= high[:, j] << (2 * (j // 4))
    hmask = torch.zeros(nb, 32, dtype=torch.int64)
    for k in range(8):  # values 32k .. 32k+31 put their third bit into bit k of hmask[0..31]
        hmask |= ((L[:, 32 * k : 32 * k + 32] >> 2) & 1) << k
    out = torch.cat([hmask, _interleave_2bit(L & 3), packed, _f16_bytes(fit.d)], dim=1)
    return out.to(torch.uint8)


def _fit_q45(x: torch.Tensor, qtype: str, nmax: int, rmin: float, nstep: int) -> KFit:
    import torch

    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32)
    # sqrtf is correctly rounded; torch's vectorised float32 sqrt (Sleef, 0.5001 ulp) is not
    # always, so take it in float64 and round once
    av = torch.sqrt((_seq_sum_sq(sub) / 32.0).double()).float()
    scales, mins, L = make_qkx2(sub, av[:, None] + sub.abs(), nmax, rmin, 0.1, nstep, False)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale = _running_max(scales)
    max_min = _running_max(mins)
    s63 = torch.tensor(63.0)
    inv_s = torch.where(max_scale > 0, s63 / torch.where(max_scale > 0, max_scale, s63), 0 * s63)
    inv_m = torch.where(max_min > 0, s63 / torch.where(max_min > 0, max_min, s63), 0 * s63)
    ls = torch.clamp(_rnd(inv_s[:, None] * scales).to(torch.int64) & 0xFF, max=63)
    lm = torch.clamp(_rnd(inv_m[:, None] * mins).to(torch.int64) & 0xFF, max=63)
    d = _f16(max_scale / s63)
    dmin = _f16(max_min / s63)
    return KFit(qtype, d, ls, L.reshape(nb, 256).to(torch.int64), dmin, lm)


def _pack_q4(fit: KFit, L: torch.Tensor) -> torch.Tensor:
    import torch

    assert fit.mc is not None and fit.dmin is not None
    v = L.reshape(-1, 4, 2, 32)
    qs = (v[:, :, 0] | (v[:, :, 1] << 4)).reshape(-1, 128)
    scales = _pack_scale_min_k4(fit.sc, fit.mc)
    out = torch.cat([_f16_bytes(fit.d), _f16_bytes(fit.dmin), scales, qs], dim=1)
    return out.to(torch.uint8)


def _pack_q5(fit: KFit, L: torch.Tensor) -> torch.Tensor:
    import torch

    assert fit.mc is not None and fit.dmin is not None
    v = L.reshape(-1, 4, 2, 32)
    lo = v & 0xF
    qs = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(-1, 128)
    qh = torch.zeros(v.shape[0], 32, dtype=torch.int64)
    for c in range(4):
        qh |= (v[:, c, 0] >> 4) << (2 * c)
        qh |= (v[:, c, 1] >> 4) << (2 * c + 1)
    scales = _pack_scale_min_k4(fit.sc, fit.mc)
    out = torch.cat([_f16_bytes(fit.d), _f16_bytes(fit.dmin), scales, qh, qs], dim=1)
    return out.to(torch.uint8)


def _fit_q6(x: torch.Tensor) -> KFit:
    import torch

    scales, L, amax, max_scale = _signed_sub_scales(x, make_qx, 32)
    zero = amax < GROUP_MAX_EPS
    safe_m = torch.where(zero, torch.ones_like(max_scale), max_scale)
    iscale = -128.0 / safe_m
    d = _f16(torch.where(zero, torch.zeros_like(iscale), 1 / iscale))
    sc = torch.clamp(_rnd(iscale[:, None] * scales), max=127).to(torch.int64)
    sc = torch.where(zero[:, None], torch.zeros_like(sc), sc)
    helper = torch.where(zero[:, None], torch.zeros_like(L), L)
    return KFit("Q6_K", d, sc, helper.to(torch.int64))


def _pack_q6(fit: KFit, L: torch.Tensor) -> torch.Tensor:
    import torch

    nb = L.shape[0]
    v = L.reshape(nb, 2, 4, 32)
    lo = v & 0xF
    ql = torch.cat([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], dim=2)
    hi = v >> 4
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    out = torch.cat([ql.reshape(nb, 128), qh.reshape(nb, 64), fit.sc & 0xFF, _f16_bytes(fit.d)], 1)
    return out.to(torch.uint8)


_FITS = {
    "Q2_K": _fit_q2,
    "Q3_K": _fit_q3,
    "Q4_K": lambda x: _fit_q45(x, "Q4_K", 15, -1.0, 20),
    "Q5_K": lambda x: _fit_q45(x, "Q5_K", 31, -0.5, 15),
    "Q6_K": _fit_q6,
}
_PACKERS = {
    "Q2_K": _pack_q2,
    "Q3_K": _pack_q3,
    "Q4_K": _pack_q4,
    "Q5_K": _pack_q5,
    "Q6_K": _pack_q6,
}


def quantize_rows(qtype: str, w: torch.Tensor) -> np.ndarray:
    """A 2-D float tensor [rows, cols] (cols a multiple of 256) as llama.cpp's reference
    quantizer stores it: uint8 [rows, cols / 256 * block bytes]."""
    rows, cols = w.shape
    if cols % QK_K:
        raise ValueError(f"{qtype} needs rows of a multiple of {QK_K} values, not {cols}")
    raw = quantize_blocks(qtype, w.float().reshape(-1, QK_K).contiguous())
    return raw.reshape(rows, cols // QK_K * BLOCK_BYTES[qtype])
