"""compressed-tensors pack-quantized output: bit packing, and transformers loading it on CPU.

The loader tests write a tiny Llama whose Linear weights (all but lm_head) are RTN
codes packed by cllm, load it with plain `AutoModelForCausalLM.from_pretrained`, and
require the logits of the fake-quantized model exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cllm.core.quantize.grid import IntGrid, dequantize_groups, quantize_rtn
from cllm.errors import InputError, UsageError
from cllm.formats import compressed_tensors as ct
from cllm.formats.safetensors_io import (
    TOKENIZER_FILES,
    PlannedTensor,
    torch_dtype_name,
    write_safetensors_file,
)

# -- packing -------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("cols", [1, 3, 31, 32, 33, 64, 100, 577])
def test_pack_roundtrip(bits: int, cols: int) -> None:
    g = torch.Generator().manual_seed(bits * 1000 + cols)
    codes = torch.randint(0, 1 << bits, (5, cols), generator=g)
    packed = ct.pack_weight(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (5, -(-cols * bits // 32))
    assert torch.equal(ct.unpack_weight(packed, bits, cols), codes.to(torch.int32))


def test_pack_accepts_float_codes_and_crosses_chunks() -> None:
    rows = ct._CHUNK_ROWS + 3
    codes = torch.randint(0, 8, (rows, 45)).float()  # quantize_rtn returns float codes
    packed = ct.pack_weight(codes, 3)
    assert torch.equal(ct.unpack_weight(packed, 3, 45), codes.to(torch.int32))


def test_pack_layout_is_a_dense_little_endian_bit_stream() -> None:
    # element j at bit 3*j: element 10 straddles words 0 and 1 (bits 30..32)
    codes = torch.zeros(1, 11, dtype=torch.int64)
    codes[0, 0] = 5  # bits 0..2
    codes[0, 10] = 0b111  # bits 30, 31 of word 0 and bit 0 of word 1
    packed = ct.pack_weight(codes, 3)
    assert packed.shape == (1, 2)
    assert packed[0, 0].item() == 5 - (1 << 32) + (0b11 << 30)
    assert packed[0, 1].item() == 1


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_pack_matches_compressed_tensors(bits: int) -> None:
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    codes = torch.randint(0, 1 << bits, (6, 70))
    signed = (codes - (1 << (bits - 1))).to(torch.int8)
    assert torch.equal(ct.pack_weight(codes, bits), helpers.pack_to_int32(signed, bits))
    # the zero point is packed along the output dim
    zp = helpers.pack_to_int32(signed, bits, packed_dim=0)
    assert torch.equal(ct.pack_weight(codes.t(), bits).t(), zp)
    back = helpers.unpack_from_int32(ct.pack_weight(codes, bits), bits, codes.shape)
    assert torch.equal(back, signed)


def test_pack_errors() -> None:
    with pytest.raises(UsageError, match="outside the 4-bit range"):
        ct.pack_weight(torch.tensor([[16]]), 4)
    with pytest.raises(UsageError, match="outside"):
        ct.pack_weight(torch.tensor([[-1]]), 4)
    with pytest.raises(UsageError, match="9-bit"):
        ct.pack_weight(torch.tensor([[1]]), 9)
    with pytest.raises(InputError, match="words per row"):
        ct.unpack_weight(torch.zeros(2, 3, dtype=torch.int32), 4, 32)
    with pytest.raises(InputError, match="int32"):
        ct.unpack_weight(torch.zeros(2, 4, dtype=torch.int64), 4, 32)


def test_quantization_config_and_spec() -> None:
    qc = ct.quantization_config(3, -1, True, ["lm_head"])
    w = qc["config_groups"]["group_0"]["weights"]
    assert (w["strategy"], w["group_size"], w["num_bits"]) == ("channel", None, 3)
    assert ct.spec_from_config({"quantization_config": qc}) == ct.PackedSpec(3, -1, True)
    qc = ct.quantization_config(4, 32, False, [])
    assert ct.spec_from_config(qc) == ct.PackedSpec(4, 32, False)
    with pytest.raises(InputError, match="format"):
        ct.spec_from_config({**qc, "format": "naive-quantized"})
    cfg_mod = pytest.importorskip("compressed_tensors.quantization")
    parsed = cfg_mod.QuantizationConfig.model_validate(qc)
    assert parsed.format == "pack-quantized"
    assert parsed.config_groups["group_0"].weights.group_size == 32


# -- a real loader -------------------------------------------------------------


def _write_packed(
    src: Path, dst: Path, bits: int, group: int, symmetric: bool, pad_zero_point: bool = True
) -> dict:
    """Quantize every Linear but lm_head with RTN; write a pack-quantized HF folder.

    `pad_zero_point=False` writes the zero points of cllm before the default-load fix (and
    of compressed-tensors' own compressor).

    Returns the fake-quantized state dict (weights replaced by their dequantized codes).
    """
    from safetensors.torch import load_file

    grid = IntGrid(bits, group, symmetric)
    fake, tensors = {}, {}
    for name, t in load_file(src / "model.safetensors").items():
        if name.endswith("_proj.weight"):
            codes, scales, zeros = quantize_rtn(t, grid)
            fake[name] = dequantize_groups(codes, scales, zeros, grid.group_width(t.shape[1]))
            prefix = name.removesuffix(".weight")
            zp = None if symmetric else zeros
            tensors.update(
                ct.linear_tensors(
                    prefix, codes, scales, zp, bits, group, pad_zero_point=pad_zero_point
                )
            )
        else:
            fake[name] = tensors[name] = t
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = ct.quantization_config(bits, group, symmetric, ["lm_head"])
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for fname in TOKENIZER_FILES:
        if (src / fname).exists():
            shutil.copyfile(src / fname, dst / fname)
    plans = [
        PlannedTensor(n, tuple(t.shape), torch_dtype_name(t.dtype), lambda t=t: t)
        for n, t in tensors.items()
    ]
    write_safetensors_file(dst / "model.safetensors", plans, {"format": "pt"})
    return fake


def _logits_diff(src: Path, folder: Path, fake: dict, **load_kwargs) -> tuple[float, bool]:
    """Max abs logit difference, and whether the loaded model kept packed weights."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(folder), **load_kwargs).eval()
    packed = any(n.endswith(".weight_packed") for n, _ in loaded.named_parameters())
    ref = AutoModelForCausalLM.from_pretrained(str(src)).eval()
    ref.load_state_dict(fake)
    ids = torch.randint(0, 264, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (loaded(ids).logits - ref(ids).logits).abs().max().item(), packed


def _check_own_reader(folder: Path, fake: dict) -> None:
    from safetensors.torch import load_file

    stored = load_file(folder / "model.safetensors")
    spec = ct.spec_from_config(json.loads((folder / "config.json").read_text()))
    prefixes = {p for p in map(ct.packed_prefix, stored) if p}
    assert len(prefixes) == 14
    for prefix in prefixes:
        w = ct.dequantize_checkpoint_linear(stored.__getitem__, prefix, spec, set(stored))
        assert torch.equal(w, fake[f"{prefix}.weight"]), prefix


@pytest.mark.parametrize(("bits", "group"), [(4, 32), (8, 32), (3, 32), (4, -1), (8, -1), (3, -1)])
def test_transformers_loads_symmetric(
    tiny_model: Path, tmp_path: Path, bits: int, group: int
) -> None:
    pytest.importorskip("compressed_tensors")
    folder = tmp_path / "packed"
    fake = _write_packed(tiny_model, folder, bits, group, symmetric=True)
    stored = json.loads((folder / "config.json").read_text())
    assert stored["quantization_config"]["ignore"] == ["lm_head"]
    # the default load keeps the packed int32 weights (decompressed on the first forward)
    assert _logits_diff(tiny_model, folder, fake) == (0.0, True)
    _check_own_reader(folder, fake)


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
@pytest.mark.parametrize(("bits", "group"), [(4, 32), (3, -1)])
@pytest.mark.parametrize("pad", [True, False], ids=["padded-zp", "unpadded-zp"])
def test_transformers_loads_asymmetric_with_dequantize(
    tiny_model: Path, tmp_path: Path, bits: int, group: int, pad: bool
) -> None:
    pytest.importorskip("compressed_tensors")
    from transformers import CompressedTensorsConfig

    folder = tmp_path / "packed"
    fake = _write_packed(tiny_model, folder, bits, group, symmetric=False, pad_zero_point=pad)
    diff = _logits_diff(
        tiny_model, folder, fake, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    assert diff == (0.0, False)  # dequantized at load time
    _check_own_reader(folder, fake)


@pytest.mark.parametrize(("bits", "group"), [(4, 32), (3, -1), (8, 32)])
def test_transformers_default_load_of_asymmetric(
    tiny_model: Path, tmp_path: Path, bits: int, group: int
) -> None:
    """What a user does: plain `from_pretrained(path)`, no extra config (the padded zero
    point is what makes this work with transformers 5.x + compressed-tensors 0.20)."""
    pytest.importorskip("compressed_tensors")
    from safetensors import safe_open

    folder = tmp_path / "packed"
    fake = _write_packed(tiny_model, folder, bits, group, symmetric=False)
    with safe_open(folder / "model.safetensors", "pt") as f:
        zp = f.get_tensor("model.layers.0.mlp.down_proj.weight_zero_point")
        shape = f.get_tensor("model.layers.0.mlp.down_proj.weight_shape").tolist()
    groups = 1 if group == -1 else shape[1] // group
    assert (zp.dtype, tuple(zp.shape)) == (torch.int32, (shape[0], groups))
    # loads packed (decompressed on the first forward) with exactly the fake-quantized logits
    assert _logits_diff(tiny_model, folder, fake) == (0.0, True)
    _check_own_reader(folder, fake)


def test_unpadded_zero_point_is_still_rejected_by_default(tiny_model: Path, tmp_path: Path) -> None:
    """Canary: compressed-tensors' own unpadded zero point does not load by default. If this
    starts to pass upstream (meta-device compression packing the zero point), the padded
    layout may stop loading: re-check `test_transformers_default_load_of_asymmetric`."""
    pytest.importorskip("compressed_tensors")
    folder = tmp_path / "packed"
    fake = _write_packed(tiny_model, folder, 4, 32, symmetric=False, pad_zero_point=False)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        _logits_diff(tiny_model, folder, fake)


@pytest.mark.parametrize(
    ("bits", "rows", "group"), [(4, 20, 32), (3, 37, -1), (8, 9, 32), (2, 1, 32)]
)
def test_zero_point_layouts_match_compressed_tensors(bits: int, rows: int, group: int) -> None:
    """Both zero-point layouts decompress, through compressed-tensors' own
    `PackedQuantizationCompressor.decompress`, to cllm's dequantized weight; the unpadded
    one is byte for byte what its `compress` writes."""
    base = pytest.importorskip("compressed_tensors.compressors.pack_quantized.base")
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    cols = 64
    groups = 1 if group == -1 else cols // group
    g = torch.Generator().manual_seed(bits * 100 + rows)
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=g)
    zero = torch.randint(0, 1 << bits, (rows, groups), generator=g).float()
    scale = torch.rand(rows, groups, generator=g) + 0.5
    strategy = "channel" if group == -1 else "group"
    args = QuantizationArgs(
        num_bits=bits, symmetric=False, strategy=strategy, group_size=None if group == -1 else group
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    width = cols if group == -1 else group
    want = scale.repeat_interleave(width, 1) * (codes.float() - zero.repeat_interleave(width, 1))
    signed_zp = (zero - (1 << (bits - 1))).to(torch.int8)
    ours = ct.linear_tensors("m", codes, scale, zero, bits, group, pad_zero_point=False)
    theirs = base.PackedQuantizationCompressor.compress(
        {"weight": want, "weight_scale": scale, "weight_zero_point": signed_zp}, scheme
    )
    assert torch.equal(ours["m.weight_zero_point"], theirs["weight_zero_point"])
    for pad in (True, False):
        t = ct.linear_tensors("m", codes, scale, zero, bits, group, pad_zero_point=pad)
        local = {k.removeprefix("m."): v for k, v in t.items()}
        planned = ct.planned_shapes(rows, cols, bits, group, False, pad_zero_point=pad)
        assert {k: tuple(v.shape) for k, v in local.items()} == {
            k: s for k, (s, _) in planned.items()
        }
        if pad:
            assert local["weight_zero_point"].shape == (rows, groups)
        assert torch.equal(ct.dequantize_linear(local, bits), want)
        out = base.PackedQuantizationCompressor.decompress(dict(local), scheme)
        assert torch.equal(out["weight_zero_point"], signed_zp)
        assert torch.equal(out["weight"], want)


def test_unpack_rejects_a_wrong_zero_point_shape() -> None:
    codes = torch.randint(0, 16, (20, 64))
    t = ct.linear_tensors("m", codes, torch.ones(20, 2), torch.full((20, 2), 3.0), 4, 32)
    local = {k.removeprefix("m."): v for k, v in t.items()}
    local["weight_zero_point"] = local["weight_zero_point"][:7]
    with pytest.raises(InputError, match=r"not packed \[3, 2\] or padded \[20, 2\]"):
        ct.unpack_linear(local, 4)
