"""Sparse inputs to quantization: which weights were pruned, and which outputs keep them at zero.

`cllm prune` stores a pruned model dense, with exact zeros. Quantizing it can undo the
pruning silently in two ways: GPTQ's error feedback moves pruned weights off zero (about
a tenth of them end up on a nonzero code), and some formats have no code that decodes to
exactly zero. The first is fixed by handing GPTQ the mask (`gptq_quantize(mask=...)`); the
second only by choosing another type, so the quantize job warns about it.

Which types keep an exact zero was measured, not assumed, on a 50%-sparse model whose rows
are multiples of 256 (so llama.cpp's K-quants do not fall back to legacy types), by reading
every quantized linear weight back and counting input zeros that decode to nonzero:

- cllm's int grids, symmetric AND asymmetric, 2 to 8 bits, any group size, RTN with and
  without --clip, GPTQ with the mask: no zero lost. An asymmetric grid keeps zero because
  its range always includes 0 and its zero point is an integer code (stored as such in
  compressed-tensors), so a zero weight lands on `scale * (zero - zero)`.
- Q4_0, Q5_0, Q8_0 (cllm's grids, gguf-py's and llama.cpp's quantizers), Q6_K, Q3_K,
  TQ1_0, TQ2_0, F16, BF16, F32: no zero lost (`d * (q - offset)` with a code at the offset).
- Q4_1, Q5_1 (`d * q + m`), Q2_K, Q4_K, Q5_K (`d * sc * q - dmin * m`): ~99% of zeros lost.
- IQ4_NL, IQ4_XS, IQ3_S: every zero lost; IQ2_*, IQ3_XXS (grids of magnitudes 8/25/43 and
  4..62) and IQ1_* (`d * (grid + delta)`, delta = +-1/8) have no zero value at all.

llama.cpp file types are recipes: Q4_K_M holds Q4_K (loses zeros) and Q6_K tensors, and
where rows are not multiples of 256 it falls back to Q5_0/Q8_0 (which keep them), so
whether a K-quant file keeps the zeros depends on the model; `holds_exact_zero` of a file
type answers for every model, the written file's tensor types answer for this one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from cllm.core.quantize.api import Target
    from cllm.core.quantize.grid import Grid
    from cllm.formats.checkpoint import Checkpoint

# A weight counts as pruned when at least this fraction of it is exactly zero. Dense float
# checkpoints stay far below: SmolLM2-135M (fp32, as converted from its Q4_1 GGUF) has
# 33,483 exact zeros in 106M linear weights, at most 0.07% in any one tensor; pruning worth
# doing removes 20-50% or more (2:4 is 50%). Quantized storage is another matter (a Q4_0
# block decodes ~12% of a Gaussian's weights to 0, int2 about half), so zeros of tensors
# stored quantized count only when the input's provenance records a prune.
SPARSE_MIN_ZEROS = 0.10

FLOAT_STORAGE = frozenset({"F64", "F32", "F16", "BF16"})

# stored tensor types whose codes include one decoding to exactly 0, which is where a zero
# weight lands (measured: see the module docstring)
ZERO_KEEPING_TENSOR_TYPES = frozenset(
    {"F64", "F32", "F16", "BF16", "Q8_0", "Q5_0", "Q4_0", "Q6_K", "Q3_K", "TQ1_0", "TQ2_0"}
)
# llama.cpp file types whose recipe puts linear weights only in such types, whatever the
# model's widths (fallbacks where rows are not multiples of 256: Q6_K -> Q8_0, TQ -> Q4_0).
# Q3_K_S kept every zero on each shape tried, but is left out: llama.cpp's recipe raises
# attn_v of 70B models from Q3_K to Q5_K (llama_tensor_get_type).
ZERO_KEEPING_FILE_TYPES = frozenset(
    {"F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_0", "Q4_0", "TQ1_0", "TQ2_0"}
)
SUGGESTED_TYPES = "--gguf-type Q4_0, Q5_0 or Q8_0 (Q6_K too with RTN), or --to safetensors"

NM_GROUPS = (4, 8, 16)  # the M of N:M patterns `cllm info` recognises


def nonzero_array(t: torch.Tensor) -> np.ndarray:
    """A bool array, True where `t` is not exactly 0 (+0 and -0 both count as zero).

    numpy rather than torch: on a loaded 2-core machine torch's multi-threaded reductions
    ran 10-30x slower than numpy's single-threaded ones (0.13 s for SmolLM2's linear weights).
    """
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: compare the bits without the sign
        return (t.view(torch.int16).numpy() & 0x7FFF) != 0
    return t.numpy() != 0


def zero_count(t: torch.Tensor) -> int:
    nz = nonzero_array(t)
    return int(nz.size - np.count_nonzero(nz))


def max_nonzeros_per_group(nonzero: np.ndarray) -> dict[int, int]:
    """For each M of `NM_GROUPS` whose groups tile the rows: the most nonzeros any group of
    M consecutive inputs (in any row) holds. N:M sparsity is exactly "this is at most N"."""
    if nonzero.ndim != 2:
        return {}
    rows, cols = nonzero.shape
    if cols % 4 or nonzero.size == 0:
        return {}
    nz = np.ascontiguousarray(nonzero, dtype=np.bool_)
    out: dict[int, int] = {}
    if hasattr(np, "bitwise_count"):  # numpy >= 2: a group of 4 (8) bool bytes is one uint32 (64)
        c4 = np.bitwise_count(nz.view(np.uint32))
    else:  # pragma: no cover - numpy 1.x
        c4 = nz.reshape(rows, cols // 4, 4).sum(axis=2, dtype=np.uint8)
    out[4] = int(c4.max())
    if cols % 8:
        return out
    if hasattr(np, "bitwise_count"):
        c8 = np.bitwise_count(nz.view(np.uint64))
    else:  # pragma: no cover
        c8 = c4.reshape(rows, cols // 8, 2).sum(axis=2, dtype=np.uint8)
    out[8] = int(c8.max())
    if cols % 16 == 0:
        out[16] = int(c8.reshape(rows, cols // 16, 2).sum(axis=2, dtype=np.uint8).max())
    return out


def nm_pattern(max_nonzeros: dict[int, int], sparsity: float) -> str | None:
    """The N:M pattern a model's linear weights follow, e.g. "2:4", or None.

    `max_nonzeros` holds, per M, the most nonzeros of any group over every linear weight
    (an M absent: some row is not tiled by it). A pattern is real when N < M and it
    explains the sparsity: every group then has at most N nonzeros, so sparsity is at least
    1 - N/M; more than 1/M above that (one more zero per group on average) means the zeros
    came from elsewhere (a 50% unstructured model has no group of 16 fully dense, but
    "15:16" says nothing about it). Of several patterns the tightest wins, the smallest M on
    a tie: a 2:4 model is also 4:8 and 8:16.
    """
    best: tuple[float, int, int] | None = None
    for m, n in max_nonzeros.items():
        if n >= m or sparsity - (1 - n / m) > 1 / m + 1e-9:
            continue
        key = (n / m, m, n)
        if best is None or key < best:
            best = key
    return None if best is None else f"{best[2]}:{best[1]}"


def pruned_upstream(ckpt: Checkpoint) -> bool:
    """Whether the input's provenance records a `cllm prune` (then the zeros of tensors it
    stores quantized are pruning too, not only rounding)."""
    from cllm.formats.provenance import chain

    return any(p.get("op") == "prune" for p in chain(ckpt.provenance))


def zeros_are_pruning(dtype: str, zeros: int, numel: int, pruned: bool = False) -> bool:
    """The rule every caller shares: enough exact zeros, in a tensor whose zeros are not
    just quantization rounding (stored as floats, or pruned upstream)."""
    if numel == 0 or zeros < SPARSE_MIN_ZEROS * numel:
        return False
    return dtype in FLOAT_STORAGE or pruned


class MaskPolicy:
    """Decides, per weight about to be quantized, whether GPTQ must hold its zeros; the
    provenance chain is read once per checkpoint rather than once per tensor."""

    def __init__(self, ckpt: Checkpoint | None) -> None:
        self.ckpt = ckpt
        self._pruned: bool | None = None

    def mask(self, name: str, w: torch.Tensor) -> torch.Tensor | None:
        """`w != 0` for a pruned weight, None for a dense one (GPTQ then runs unchanged)."""
        nz = nonzero_array(w)
        zeros = int(nz.size - np.count_nonzero(nz))
        if zeros < SPARSE_MIN_ZEROS * max(nz.size, 1):
            return None
        dtype, pruned = "F32", False
        if self.ckpt is not None:
            info = self.ckpt.tensor_infos().get(name)
            dtype = info.dtype if info is not None else "F32"
            if dtype not in FLOAT_STORAGE:
                if self._pruned is None:
                    self._pruned = pruned_upstream(self.ckpt)
                pruned = self._pruned
        if not zeros_are_pruning(dtype, zeros, nz.size, pruned):
            return None
        return torch.from_numpy(nz).to(w.dtype)


@dataclass
class SparseScan:
    """Which of the weights to be quantized are pruned (exact zeros), and how many zeros."""

    tensors: int = 0
    sparse: list[str] = field(default_factory=list)
    zeros: int = 0  # over the sparse tensors
    params: int = 0  # over the sparse tensors

    @property
    def any(self) -> bool:
        return bool(self.sparse)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.params if self.params else 0.0

    def to_dict(self) -> dict[str, Any]:
        """What provenance records of a sparse input (names left out: the count says enough)."""
        return {
            "tensors": self.tensors,
            "sparse_tensors": len(self.sparse),
            "sparsity": round(self.sparsity, 6),
        }


def scan_sparse(ckpt: Checkpoint, names: Iterable[str]) -> SparseScan:
    """Read each named weight once (one at a time) and record the pruned ones.

    Costs one read of the linear weights: 0.3-1.1 s for SmolLM2-135M's 106M (fp32 from the
    page cache, 2 cores shared with other work), against 22 s for its whole RTN Q4_0 job in
    the same conditions and minutes for GPTQ. Tensors stored quantized are skipped unless
    the provenance records a prune, which spares dequantizing a whole GGUF for nothing.
    """
    infos = ckpt.tensor_infos()
    pruned: bool | None = None
    scan = SparseScan()
    for name in names:
        scan.tensors += 1
        dtype = infos[name].dtype
        if dtype not in FLOAT_STORAGE:
            if pruned is None:
                pruned = pruned_upstream(ckpt)
            if not pruned:
                continue
        t = ckpt.get(name)
        zeros = zero_count(t)
        if zeros_are_pruning(dtype, zeros, t.numel(), bool(pruned)):
            scan.sparse.append(name)
            scan.zeros += zeros
            scan.params += t.numel()
    return scan


def holds_exact_zero(target: Target | Grid | str) -> bool:
    """Whether quantizing to `target` can keep a zero weight at exactly zero.

    `target`: a cllm grid, a `Target` (its int grid or GGUF type; mixed precision asks per
    layer type), or a stored tensor type / llama.cpp file type name ("Q4_0", "Q4_K_M").
    """
    from cllm.core.quantize.api import Target
    from cllm.core.quantize.grid import GGUF_GRIDS, GGUFGrid, IntGrid

    if isinstance(target, IntGrid):
        return True  # symmetric or not: see the module docstring
    if isinstance(target, GGUFGrid):
        return not GGUF_GRIDS[target.qtype][1]  # the _1 types decode d*q + m
    if isinstance(target, Target):
        if target.to != "gguf":
            return True
        if target.layer_types is not None:
            return all(holds_exact_zero(t) for t in target.layer_types)
        return holds_exact_zero(str(target.gguf_type))
    name = str(target).upper()
    if name.startswith("CT_INT"):  # a compressed-tensors packed weight (`cllm info` type)
        return True
    return name in ZERO_KEEPING_FILE_TYPES or name in ZERO_KEEPING_TENSOR_TYPES
