"""Block packing for llama.cpp's legacy types: byte-exact against gguf-py's reference quantizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, np_roundf, quantize

from cllm.core.quantize.grid import GGUFGrid, dequantize_groups, quantize_rtn
from cllm.errors import UsageError
from cllm.formats.gguf_pack import SPECS, pack_blocks, quantize_reference, unpack_blocks

QTYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
F32 = np.float32


def gtype(qtype: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[qtype]


def weights(seed: int, rows: int = 24, cols: int = 128) -> np.ndarray:
    """Random rows plus the awkward ones: constant, all-zero, sprinkled zeros, +/- ties, big."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * 0.02).astype(F32)
    w[0] = 0.0
    w[1] = F32(0.3)
    w[2] = F32(-1.7)
    w[3, ::3] = 0.0
    w[4, :32] = 0.0
    w[4, 5] = F32(0.01)  # a block with a single non-zero
    w[5, :32] = rng.integers(-8, 8, 32).astype(F32)  # integers: exact ties in x*id + 8.5
    w[5, 40], w[5, 41] = F32(0.05), F32(-0.05)  # equal-magnitude max of both signs
    w[6] = rng.uniform(-3, 3, cols).astype(F32)
    w[7, 32:64] = rng.uniform(0.5, 1.0, 32).astype(F32)  # a block with min > 0
    w[8, :32] = rng.uniform(-1.0, -0.5, 32).astype(F32)  # a block with max < 0
    return w


def reference_codes(qtype: str, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """llama.cpp's reference rules (gguf-py `quantize_blocks`), as (codes, scale, zero)."""
    rows, cols = w.shape
    b = w.reshape(-1, 32).astype(F32)
    with np.errstate(divide="ignore"):
        if qtype in ("Q4_0", "Q5_0"):
            half = 8 if qtype == "Q4_0" else 16
            imax = np.abs(b).argmax(axis=-1, keepdims=True)
            mx = np.take_along_axis(b, imax, axis=-1)
            d = mx / F32(-half)
            inv = np.where(d == 0, F32(0), F32(1) / d)
            q = np.trunc(b * inv + F32(half + 0.5)).clip(0, 2 * half - 1)
            scale = d.astype(np.float16).astype(F32)
            zero = np.full_like(scale, half)
        elif qtype in ("Q4_1", "Q5_1"):
            maxq = 15 if qtype == "Q4_1" else 31
            mx = b.max(axis=-1, keepdims=True)
            mn = b.min(axis=-1, keepdims=True)
            d = (mx - mn) / F32(maxq)
            inv = np.where(d == 0, F32(0), F32(1) / d)
            q = np.trunc((b - mn) * inv + F32(0.5)).clip(0, maxq)
            d16 = d.astype(np.float16).astype(F32)
            m16 = mn.astype(np.float16).astype(F32)
            const = d16 == 0  # llama.cpp: d = 0, m = the value, codes 0
            assert (q[const[:, 0]] == 0).all()
            scale = np.where(const, F32(1), d16)
            zero = np.where(const, -m16, -m16 / np.where(const, F32(1), d16)).astype(F32)
        else:
            d = np.abs(b).max(axis=-1, keepdims=True) / F32(127)
            inv = np.where(d == 0, F32(0), F32(1) / d)
            q = np_roundf(b * inv) + 127
            scale = d.astype(np.float16).astype(F32)
            zero = np.full_like(scale, 127)
    return q.reshape(rows, cols), scale.reshape(rows, -1), zero.reshape(rows, -1)


def test_specs_match_gguf() -> None:
    for q in QTYPES:
        assert GGML_QUANT_SIZES[gtype(q)] == (32, SPECS[q].type_size)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_golden_bytes_match_llama_cpp_reference(qtype: str, seed: int) -> None:
    w = weights(seed)
    codes, scale, zero = reference_codes(qtype, w)
    packed = pack_blocks(qtype, codes, scale, zero)
    ref = quantize(w, gtype(qtype))
    assert packed.dtype == np.uint8 and packed.shape == ref.shape
    np.testing.assert_array_equal(packed, ref)


def random_triple(
    qtype: str, seed: int, rows: int = 16, cols: int = 256
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    spec = SPECS[qtype]
    nb = cols // 32
    codes = rng.integers(0, spec.maxq + 1, (rows, cols), dtype=np.int64)
    d = (rng.standard_normal((rows, nb)) * 0.01).astype(np.float16).astype(F32)
    if spec.has_min:
        d = np.abs(d)
        d[d == 0] = F32(2.0**-14)
        m = (rng.standard_normal((rows, nb)) * 0.1).astype(np.float16).astype(F32)
        m[0, 0] = 0.0
        zero = (-m / d).astype(F32)
        # a constant block in GGUFGrid's convention: scale 1, zero -m, codes 0
        d[1, 1], zero[1, 1] = 1.0, -m[1, 1]
        codes[1, 32:64] = 0
    else:
        d[0, 0] = 0.0
        zero = np.full((rows, nb), spec.zero, dtype=F32)
    return codes, d, zero


@pytest.mark.parametrize("qtype", QTYPES)
def test_round_trip_and_gguf_dequantize(qtype: str) -> None:
    spec = SPECS[qtype]
    for seed in range(3):
        codes, scale, zero = random_triple(qtype, seed)
        packed = pack_blocks(qtype, codes, scale, zero)
        c2, s2, z2 = unpack_blocks(qtype, packed)
        assert c2.dtype == np.uint8 and s2.dtype == F32 and z2.dtype == F32
        np.testing.assert_array_equal(c2, codes)
        np.testing.assert_array_equal(s2, scale)
        np.testing.assert_array_equal(z2, zero)

        expect = dequantize_groups(
            torch.from_numpy(codes).float(), torch.from_numpy(scale), torch.from_numpy(zero), 32
        ).numpy()
        got = dequantize(packed, gtype(qtype))
        if spec.has_min:  # llama.cpp computes d*q + m; zero = -m/d is a float32 rounding of m
            s = np.repeat(np.abs(scale), 32, axis=1)
            z = np.repeat(np.abs(zero), 32, axis=1)
            tol = 2.0**-22 * s * (spec.maxq + z)
            assert (np.abs(got - expect) <= tol).all()
        else:
            np.testing.assert_array_equal(got, expect)


def test_torch_and_numpy_inputs_agree() -> None:
    codes, scale, zero = random_triple("Q5_1", 7)
    a = pack_blocks("Q5_1", codes, scale, zero)
    b = pack_blocks(
        "Q5_1", torch.from_numpy(codes).float(), torch.from_numpy(scale), torch.from_numpy(zero)
    )
    c = pack_blocks("Q5_1", codes.astype(np.uint8), scale.astype(np.float64), zero)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    flat = unpack_blocks("Q5_1", a[0].tobytes())
    np.testing.assert_array_equal(flat[0][0], codes[0])


@pytest.mark.parametrize("qtype", QTYPES)
def test_ggufgrid_packs_to_what_llama_cpp_decodes(qtype: str) -> None:
    spec = SPECS[qtype]
    for seed in range(2):
        w = weights(seed, rows=32, cols=256)
        grid = GGUFGrid(qtype)
        codes, scale, zero = quantize_rtn(torch.from_numpy(w), grid)
        packed = pack_blocks(qtype, codes, scale, zero)
        got = dequantize(packed, gtype(qtype))
        expect = dequantize_groups(codes, scale, zero, 32).numpy()
        s = np.repeat(np.abs(scale.numpy()), 32, axis=1)
        if spec.has_min:
            z = np.repeat(np.abs(zero.numpy()), 32, axis=1)
            assert (np.abs(got - expect) <= 1e-6 * s * (spec.maxq + z)).all()
        else:
            np.testing.assert_array_equal(got, expect)

        # same stored d (and m) as llama.cpp's quantizer, byte for byte
        ref = quantize(w, gtype(qtype))
        head = 4 if spec.has_min else 2
        rb = ref.reshape(32, -1, spec.type_size)
        pb = packed.reshape(32, -1, spec.type_size)
        np.testing.assert_array_equal(pb[..., :head], rb[..., :head])
        # codes are the nearest point of that grid, so never worse than llama.cpp's
        ref_err = np.abs(dequantize(ref, gtype(qtype)) - w)
        assert (np.abs(got - w) <= ref_err + 1e-6 * s).all()
        # constant and all-zero rows come out identical to llama.cpp's
        np.testing.assert_array_equal(packed[:3], ref[:3])


def test_embedding_sized_matrix_packs() -> None:
    rng = np.random.default_rng(0)
    rows, cols = 49152, 576
    for qtype in ("Q4_0", "Q5_1"):
        spec = SPECS[qtype]
        codes = rng.integers(0, spec.maxq + 1, (rows, cols), dtype=np.uint8)
        scale = np.full((rows, cols // 32), 0.0078125, dtype=F32)
        zero = np.full((rows, cols // 32), spec.zero or -4.0, dtype=F32)
        packed = pack_blocks(qtype, codes, scale, zero)
        assert packed.shape == (rows, cols // 32 * spec.type_size)
        np.testing.assert_array_equal(unpack_blocks(qtype, packed[:64])[0], codes[:64])


def _ok(qtype: str = "Q4_0", rows: int = 2, cols: int = 64):
    codes = np.zeros((rows, cols), dtype=np.int64)
    scale = np.full((rows, cols // 32), 0.5, dtype=F32)
    zero = np.full((rows, cols // 32), SPECS[qtype].zero or 0.0, dtype=F32)
    return codes, scale, zero


def test_validation_errors() -> None:
    codes, scale, zero = _ok()
    with pytest.raises(UsageError, match="Q3_K"):
        pack_blocks("Q3_K", codes, scale, zero)
    with pytest.raises(UsageError, match=r"0\.\.15"):
        pack_blocks("Q4_0", codes + 16, scale, zero)
    with pytest.raises(UsageError, match=r"0\.\.15"):
        pack_blocks("Q4_0", codes - 1, scale, zero)
    c8, s8, z8 = _ok("Q8_0")
    with pytest.raises(UsageError, match=r"0\.\.254"):
        pack_blocks("Q8_0", c8 + 255, s8, z8)
    with pytest.raises(UsageError, match="whole numbers"):
        pack_blocks("Q4_0", codes + 0.5, scale, zero)
    with pytest.raises(UsageError, match="NaN"):
        pack_blocks("Q4_0", np.full((2, 64), np.nan), scale, zero)
    with pytest.raises(UsageError, match="multiple of the block size 32"):
        pack_blocks("Q4_0", np.zeros((2, 48)), scale, zero)
    with pytest.raises(UsageError, match="2-D"):
        pack_blocks("Q4_0", np.zeros(64), scale, zero)
    with pytest.raises(UsageError, match=r"scale must have shape \(2, 2\)"):
        pack_blocks("Q4_0", codes, scale[:, :1], zero)
    with pytest.raises(UsageError, match="zero must be 8"):
        pack_blocks("Q4_0", codes, scale, zero + 1)
    with pytest.raises(UsageError, match="not an fp16 value"):
        pack_blocks("Q4_0", codes, scale + F32(1e-5), zero)
    with pytest.raises(UsageError, match="overflows fp16"):
        pack_blocks("Q4_0", codes, scale * 1e6, zero)
    with pytest.raises(UsageError, match="NaN"):
        pack_blocks("Q4_0", codes, scale * np.nan, zero)
    c1, s1, z1 = _ok("Q4_1")
    with pytest.raises(UsageError, match=r"min \(-zero \* scale\)"):
        pack_blocks("Q4_1", c1, s1, z1 + F32(0.1001))
    # exact=False rounds to the nearest fp16 instead
    loose = pack_blocks("Q4_1", c1 + 1, s1, z1 + F32(0.1001), exact=False)
    assert np.isclose(unpack_blocks("Q4_1", loose)[2], 0.1001, rtol=1e-3).all()
    with pytest.raises(UsageError, match="18-byte blocks"):
        unpack_blocks("Q4_0", np.zeros((2, 20), dtype=np.uint8))
    with pytest.raises(UsageError, match="uint8"):
        unpack_blocks("Q4_0", np.zeros((2, 18), dtype=np.int16))


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_quantize_reference_is_byte_identical_to_gguf_py(qtype: str, seed: int) -> None:
    w = weights(seed)
    w[9, :32] = F32(6e4)  # a scale near the top of fp16
    w[10, :32] = F32(1e-9)  # a scale that underflows fp16
    w[11, :16], w[11, 16:32] = F32(2.0), F32(-2.0)
    ours = quantize_reference(qtype, w)
    assert ours.dtype == np.uint8
    assert np.array_equal(ours, quantize(w, gtype(qtype)))


def test_quantize_reference_rejects_ragged_rows() -> None:
    with pytest.raises(UsageError, match="multiple of 32"):
        quantize_reference("Q4_0", np.zeros((2, 48), dtype=F32))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_0"])
def test_quantize_reference_breaks_magnitude_ties_like_argmax(qtype: str) -> None:
    w = np.zeros((4, 64), dtype=F32)
    w[0, 3], w[0, 7] = F32(-0.5), F32(0.5)  # the first of +/-a decides the sign of d
    w[1, 3], w[1, 7] = F32(0.5), F32(-0.5)
    w[2, :32] = F32(-0.0)  # all zeros, negative: d is +0.0 (bytes differ from -0.0)
    w[3, 32:] = np.where(np.arange(32) % 2, F32(0.0), F32(-0.0))
    assert np.array_equal(quantize_reference(qtype, w), quantize(w, gtype(qtype)))


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_quantize_reference_refuses_non_finite(qtype: str, bad: float) -> None:
    from cllm.formats.gguf_pack import NonFiniteError

    w = weights(0)
    w[7, 45] = bad
    with pytest.raises(NonFiniteError):
        quantize_reference(qtype, w)


def test_q8_0_rounds_half_away_from_zero_at_every_half_integer() -> None:
    # weights that land exactly on, and one float either side of, k + 1/2 after scaling
    vals = []
    for k in range(127):
        for c in (k + 0.5, k + 1.0):
            c32 = F32(c)
            vals += [c32, np.nextafter(c32, F32(0)), np.nextafter(c32, F32(200))]
    v = np.array(vals, dtype=F32)
    v = np.concatenate([v, -v, [F32(0.49999997), F32(-0.49999997)]])
    v = v[np.abs(v) <= 127]
    w = np.zeros((1, 32 * (len(v) // 31 + 1)), dtype=F32)
    for b in range(w.shape[1] // 32):  # each block: its max 127 (so d = 1) plus 31 test values
        chunk = v[b * 31 : (b + 1) * 31]
        w[0, b * 32] = F32(127)
        w[0, b * 32 + 1 : b * 32 + 1 + len(chunk)] = chunk
    assert np.array_equal(quantize_reference("Q8_0", w), quantize(w, gtype("Q8_0")))
