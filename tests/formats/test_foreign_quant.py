"""Reading GPTQ, AWQ and AutoRound checkpoints: a tiny model packed here to each tool's
published layout by a deliberately plain packer (one big integer per bit stream, the AWQ
nibble order written out), then read by cllm and compared with scale * (q - zero)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cllm.errors import InputError
from cllm.formats.checkpoint import open_checkpoint

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble k of a word holds output column 8c + AWQ_ORDER[k]


def stream_words(values: list[int], bits: int) -> list[int]:
    """Value i at bit i * bits of one long little-endian integer, cut into int32 words."""
    total = 0
    for i, v in enumerate(values):
        total |= (int(v) & ((1 << bits) - 1)) << (i * bits)
    n_words = -(-len(values) * bits // 32)
    words = [(total >> (32 * k)) & 0xFFFFFFFF for k in range(n_words)]
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]  # as signed int32


def to_i32(words: list[int]) -> list[int]:
    return [((w & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000 for w in words]


def quantize_cols(w: torch.Tensor, bits: int, group: int, sym: bool, rng: np.random.Generator):
    """Codes q [in, out], zeros z [groups, out] and scales s [groups, out] for weight w
    [out, in]; asymmetric zeros include 0 and the maximum (the cases writers disagree on)."""
    out_f, in_f = w.shape
    groups = in_f // group
    maxq = (1 << bits) - 1
    q = torch.from_numpy(rng.integers(0, maxq + 1, size=(in_f, out_f)))
    if sym:
        z = torch.full((groups, out_f), 1 << (bits - 1), dtype=torch.int64)
    else:
        z = torch.from_numpy(rng.integers(0, maxq + 1, size=(groups, out_f)))
        z[0, :4] = 0
        z[-1, -4:] = maxq
    s = torch.rand(groups, out_f, dtype=torch.float32) * 0.02 + 0.001
    return q, z, s.half()


def gptq_parts(q, z, s, bits: int, v1: bool, perm: torch.Tensor | None):
    """qweight [in*bits/32, out], qzeros [groups, out*bits/32] (v1: whole words minus the
    packed ones, with borrows, as GPTQModel and AutoRound write it), scales, g_idx."""
    in_f, out_f = q.shape
    qweight = torch.tensor(
        [stream_words(q[:, o].tolist(), bits) for o in range(out_f)], dtype=torch.int32
    ).t()
    const = sum(1 << (k * bits) for k in range(32 // bits))
    rows = []
    for g in range(z.shape[0]):
        if v1 and bits == 3:
            rows.append(stream_words([(v - 1) & 7 for v in z[g].tolist()], bits))
        elif v1:
            rows.append(
                to_i32([(w & 0xFFFFFFFF) - const for w in stream_words(z[g].tolist(), bits)])
            )
        else:
            rows.append(stream_words(z[g].tolist(), bits))
    parts = {
        "qweight": qweight.contiguous(),
        "qzeros": torch.tensor(rows, dtype=torch.int32),
        "scales": s,
    }
    if perm is not None:
        parts["g_idx"] = perm.to(torch.int32)
    return parts


def awq_parts(q, z, s):
    def pack(m: torch.Tensor) -> torch.Tensor:
        rows = []
        for r in range(m.shape[0]):
            words = []
            for c in range(m.shape[1] // 8):
                word = 0
                for k in range(8):
                    word |= int(m[r, 8 * c + AWQ_ORDER[k]]) << (4 * k)
                words.append(word)
            rows.append(to_i32(words))
        return torch.tensor(rows, dtype=torch.int32)

    return {"qweight": pack(q), "qzeros": pack(z), "scales": s}


def write_checkpoint(
    tiny_model: Path,
    dest: Path,
    qc: dict,
    make_parts,
    group: int,
    act_order: bool = False,
    scheme: tuple[int, bool] | None = None,
) -> dict[str, torch.Tensor]:
    """The tiny model with every decoder Linear replaced by packed parts; returns the
    expected dense weights."""
    shutil.copytree(tiny_model, dest)
    tensors = load_file(dest / "model.safetensors")
    expected = {}
    rng = np.random.default_rng(0)
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not (name.startswith("model.layers.") and name.endswith("proj.weight")):
            out[name] = t
            continue
        prefix = name[: -len(".weight")]
        bits, sym = scheme or (qc["bits"], qc.get("sym", True))
        q, z, s = quantize_cols(t, bits, group, sym, rng)
        in_f = q.shape[0]
        group_of = torch.arange(in_f) // group
        if act_order:
            group_of = group_of[torch.from_numpy(rng.permutation(in_f))]
        w = (s.float()[group_of] * (q - z[group_of]).float()).t()
        expected[name] = w
        for k, v in make_parts(q, z, s, group_of if act_order else None).items():
            out[f"{prefix}.{k}"] = v
    save_file(out, dest / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((dest / "config.json").read_text())
    cfg["quantization_config"] = qc
    (dest / "config.json").write_text(json.dumps(cfg))
    return expected


CASES = {
    "gptq-v1-4bit-sym-actorder": ({"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True, "desc_act": True}, True),
    "gptq-v1-4bit-asym": ({"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False}, False),
    "gptq-v1-3bit-asym": ({"quant_method": "gptq", "bits": 3, "group_size": 32, "sym": False}, False),
    "gptq-v1-2bit-asym": ({"quant_method": "gptq", "bits": 2, "group_size": 32, "sym": False}, False),
    "gptq-v1-8bit-sym": ({"quant_method": "gptq", "bits": 8, "group_size": 64, "sym": True}, False),
    "gptq-v2-4bit-asym": ({"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False, "format": "gptq_v2"}, False),
    "autoround-auto_gptq": ({"quant_method": "auto-round", "bits": 4, "group_size": 32, "sym": False, "packing_format": "auto_round:auto_gptq"}, False),
    "autoround-v2": ({"quant_method": "intel/auto-round", "bits": 4, "group_size": 32, "sym": False, "backend": "auto_round:gptqmodel"}, False),
    "awq-gemm": ({"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "GEMM"}, False),
    "autoround-awq": ({"quant_method": "auto-round", "bits": 4, "group_size": 32, "sym": False, "packing_format": "auto_round:auto_awq"}, False),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_dequantizes_each_layout(tiny_model: Path, tmp_path: Path, case: str) -> None:
    qc, act_order = CASES[case]
    v1 = qc.get("format") != "gptq_v2" and (
        qc["quant_method"] == "gptq" or "auto_gptq" in qc.get("packing_format", "")
    )
    awq = qc["quant_method"] == "awq" or "awq" in qc.get("packing_format", "")
    group = qc["group_size"]

    def make(q, z, s, perm):
        return awq_parts(q, z, s) if awq else gptq_parts(q, z, s, qc["bits"], v1, perm)

    expected = write_checkpoint(tiny_model, tmp_path / case, qc, make, group, act_order)
    ckpt = open_checkpoint(tmp_path / case)
    infos = ckpt.tensor_infos()
    assert not any(n.endswith((".qweight", ".qzeros", ".scales", ".g_idx")) for n in infos)
    for name, w in expected.items():
        assert infos[name].shape == tuple(w.shape)
        assert infos[name].dtype.endswith(f"INT{qc['bits']}")
        torch.testing.assert_close(ckpt.get(name), w, rtol=0, atol=0)
    # the rest is read as stored
    src = open_checkpoint(tiny_model)
    torch.testing.assert_close(
        ckpt.get("model.embed_tokens.weight"), src.get("model.embed_tokens.weight")
    )


def test_a_gptq_checkpoint_evaluates_and_exports(
    tiny_model: Path, tmp_path: Path, tiny_text: Path
) -> None:
    """Through the commands: info names the layout, eval scores it, export writes floats."""
    from tests.conftest import cli_in_process

    qc = {"quant_method": "gptq", "bits": 8, "group_size": 64, "sym": True}
    write_checkpoint(
        tiny_model, tmp_path / "g", qc, lambda q, z, s, p: gptq_parts(q, z, s, 8, True, p), 64
    )
    p = cli_in_process("info", str(tmp_path / "g"), "--json")
    assert p.returncode == 0, p.stderr
    assert "GPTQ_INT8" in p.stdout
    p = cli_in_process(
        "eval",
        str(tmp_path / "g"),
        "--text",
        str(tiny_text),
        "--chunks",
        "1",
        "--ctx",
        "64",
        "--json",
    )
    assert p.returncode == 0, p.stderr
    assert np.isfinite(json.loads(p.stdout)["perplexity"])
    out = tmp_path / "dense"
    p = cli_in_process("export", str(tmp_path / "g"), "--to", "safetensors", "-o", str(out))
    assert p.returncode == 0, p.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg  # dense floats now, not GPTQ


@pytest.mark.parametrize(
    ("qc", "message"),
    [
        ({"quant_method": "gptq", "bits": 4, "format": "marlin"}, "GPTQ format 'marlin'"),
        ({"quant_method": "gptq", "bits": 4, "pack_dtype": "int16"}, "pack_dtype int16"),
        ({"quant_method": "awq", "bits": 4, "version": "gemv_fast"}, "AWQ version 'gemv_fast'"),
        ({"quant_method": "gptq", "bits": 5}, "5-bit"),
    ],
)
def test_variants_cllm_cannot_read_are_named(qc: dict, message: str) -> None:
    from cllm.formats.foreign_quant import spec_from_config

    with pytest.raises(InputError, match=message):
        spec_from_config({"quantization_config": qc})


@pytest.mark.parametrize("zp_layout", ["int8-unpacked", "int32-packed"])
def test_llm_compressor_pack_quantized_with_act_order(
    tiny_model: Path, tmp_path: Path, zp_layout: str
) -> None:
    """llm-compressor's W4A16 asymmetric with actorder=group: signed codes stored plus 8
    along each row, weight_g_idx, and the zero point unpacked int8 (compressed-tensors before
    0.10) or packed int32 along the output dim (0.10 and later)."""
    qc = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "version": "0.9.3",
        "quantization_status": "compressed", "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
            "group_size": 32, "actorder": "group"}}},
    }  # fmt: skip

    def make(q, z, s, perm):
        qo, zo = q.t(), z.t()  # [out, in], [out, groups]: compressed-tensors' orientation
        parts = {
            "weight_packed": torch.tensor(
                [stream_words(r.tolist(), 4) for r in qo], dtype=torch.int32
            ),
            "weight_scale": s.t().contiguous(),
            "weight_shape": torch.tensor(list(qo.shape), dtype=torch.int64),
            "weight_g_idx": perm.to(torch.int32),
        }
        if zp_layout == "int8-unpacked":
            parts["weight_zero_point"] = (zo - 8).to(torch.int8).contiguous()
        else:
            cols = [stream_words(zo[:, g].tolist(), 4) for g in range(zo.shape[1])]
            parts["weight_zero_point"] = torch.tensor(cols, dtype=torch.int32).t().contiguous()
        return parts

    expected = write_checkpoint(tiny_model, tmp_path / "ct", qc, make, 32, True, (4, False))
    ckpt = open_checkpoint(tmp_path / "ct")
    for name, w in expected.items():
        torch.testing.assert_close(ckpt.get(name), w, rtol=0, atol=0)
        assert ckpt.packed_linear(name) is None  # act-order groups: not kept as integers
