"""cllm's own 4-bit weights into an ONNX graph's MatMulNBits blocks, exactly.

When the checkpoint being exported already holds 4-bit integers (a packed compressed-tensors
checkpoint from `cllm quantize`, GPTQ/AWQ/RTN), re-quantizing its dequantized weights would
lose what the method chose. The graph is built with MatMulNBits at the checkpoint's group
size, then each quantized projection's blocks are overwritten with the checkpoint's codes,
scales (and zero points): weight = scale * (code - zero), the same numbers cllm computes.

MatMulNBits (4 bits) stores, per output row n and block b of `block_size` inputs:
B[n, b, :] uint8 with element j in the low nibble of byte j//2 for even j, the high nibble
for odd j; scales[n, b] in the graph's float type; zero points (when present) packed two
blocks per byte, low nibble first, else 8. The model builder fuses q/k/v into one
`qkv_proj` MatMul (rows q, then k, then v); the other projections map one to one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from cllm.errors import UsageError

_NODE = re.compile(r"^/model/layers\.(\d+)/(attn|mlp)/(\w+)/MatMul_Q4$")
_PARTS = {
    "qkv_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "o_proj": ["self_attn.o_proj"],
    "gate_proj": ["mlp.gate_proj"],
    "up_proj": ["mlp.up_proj"],
    "down_proj": ["mlp.down_proj"],
}


def packed_scheme(ckpt: Any) -> tuple[int, int, bool] | None:
    """(bits, group size, symmetric) of a checkpoint holding packed integer Linears, else None."""
    qc = ckpt.config.get("quantization_config")
    if not isinstance(qc, dict) or not hasattr(ckpt, "packed_linear"):
        return None
    if qc.get("quant_method") != "compressed-tensors":
        return None  # other tools' layouts are read as floats and quantized again
    from cllm.formats.compressed_tensors import spec_from_config

    spec = spec_from_config(ckpt.config)
    return spec.bits, spec.group_size, spec.symmetric


def check_int4_source(ckpt: Any, block_size: int) -> int:
    """The block size the export must use to keep a packed checkpoint's integers exactly."""
    scheme = packed_scheme(ckpt)
    if scheme is None:
        return block_size
    bits, group, _sym = scheme
    if bits != 4:
        raise UsageError(
            f"the checkpoint holds {bits}-bit weights; ONNX --quant int4 cannot keep them",
            "Quantize to 4 bits (cllm quantize --bits 4), or export without --quant",
        )
    if group not in (16, 32, 64, 128, 256):
        raise UsageError(
            f"the checkpoint's group size {group} has no MatMulNBits block size",
            "Quantize with --group-size 32, 64 or 128",
        )
    return group


def write_exact_int4(model_path: Path, ckpt: Any) -> int:
    """Overwrite MatMulNBits initializers of `model_path` with `ckpt`'s codes; returns how many
    projections were written. Weights stay in the external data file beside the graph."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    inits = {t.name: t for t in model.graph.initializer}
    written = 0
    for node in model.graph.node:
        m = _NODE.match(node.name) if node.op_type == "MatMulNBits" else None
        if m is None or m.group(3) not in _PARTS:
            continue
        layer = int(m.group(1))
        parts = [ckpt.packed_linear(f"model.layers.{layer}.{p}.weight") for p in _PARTS[m.group(3)]]
        if any(p is None for p in parts):
            continue  # kept in float by --keep: the builder's own int4 stays
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        block = int(attrs["block_size"])
        codes = np.concatenate([p[0].numpy().astype(np.uint8) for p in parts])  # type: ignore[index]
        scales = np.concatenate([p[1].float().numpy() for p in parts])  # type: ignore[index]
        zeros = np.concatenate([p[2].float().numpy() for p in parts])  # type: ignore[index]
        n, k = codes.shape
        nb = -(-k // block)
        if (n, k) != (int(attrs["N"]), int(attrs["K"])) or scales.shape != (n, nb):
            raise UsageError(
                f"{node.name}: checkpoint blocks {codes.shape}/{scales.shape} do not match the "
                f"graph's N={attrs['N']}, K={attrs['K']}, block {block}"
            )
        padded = np.zeros((n, nb * block), dtype=np.uint8)
        padded[:, :k] = codes
        padded[:, k:] = 8  # padding rows meet zero inputs; any code is fine, 8 decodes to 0
        q = padded.reshape(n, nb, block)
        b = q[..., 0::2] | (q[..., 1::2] << 4)
        b_name, s_name = node.input[1], node.input[2]
        _replace(inits, b_name, b.astype(np.uint8), numpy_helper)
        dtype = numpy_helper.to_array(inits[s_name]).dtype
        _replace(
            inits,
            s_name,
            scales.astype(dtype).reshape(numpy_helper.to_array(inits[s_name]).shape),
            numpy_helper,
        )
        symmetric = bool(np.all(zeros == 8))
        if len(node.input) > 3 and node.input[3]:
            zp = zeros.astype(np.uint8)
            if zp.shape[1] % 2:
                zp = np.concatenate([zp, np.full((n, 1), 8, np.uint8)], axis=1)
            _replace(
                inits, node.input[3], (zp[:, 0::2] | (zp[:, 1::2] << 4)).reshape(-1), numpy_helper
            )
        elif not symmetric:
            raise UsageError(
                f"{node.name}: the checkpoint has zero points but the graph has none",
                "Export asymmetric checkpoints with their zero points (internal error)",
            )
        written += len(parts)
    data = model_path.with_name(model_path.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file; everything is in memory
    onnx.save(
        model, str(model_path), save_as_external_data=True, all_tensors_to_one_file=True,
        location=model_path.name + ".data", size_threshold=1024,
    )  # fmt: skip
    return written


def _replace(inits: dict[str, Any], name: str, array: np.ndarray, numpy_helper: Any) -> None:
    old = inits[name]
    want = tuple(old.dims)
    if array.size != int(np.prod(want)):
        raise UsageError(f"initializer {name}: {array.shape} does not fit {want}")
    new = numpy_helper.from_array(array.reshape(want), name)
    old.CopyFrom(new)
