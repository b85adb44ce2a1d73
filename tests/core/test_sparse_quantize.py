"""Quantizing a pruned model keeps it pruned: every exact zero of the input decodes to
exactly zero from the output (GGUF and packed safetensors read back), GPTQ holds the mask
instead of letting error feedback move pruned weights, and a type without an exact zero
is named on stderr before any work."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cllm.core.job import JobResult, run_job
from cllm.core.quantize.grid import GGUFGrid, IntGrid, dequantize_groups, quantize_rtn
from cllm.core.quantize.job import QuantizeJob, QuantizeRequest
from cllm.core.quantize.methods import select_tensors
from cllm.core.quantize.sparsity import (
    SPARSE_MIN_ZEROS,
    MaskPolicy,
    holds_exact_zero,
    max_nonzeros_per_group,
    nm_pattern,
    scan_sparse,
)
from cllm.formats.checkpoint import open_checkpoint
from tests.conftest import run_cli


class Recorder:
    """Events that keep what a job would show the user."""

    def __init__(self) -> None:
        self.logs: list[str] = []
        self.warnings: list[str] = []

    def log(self, message: str, level: int = 0) -> None:
        self.logs.append(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    @contextlib.contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[Any]:
        yield lambda *a, **k: None


# tiny tensors gain nothing from threads, and on a busy machine torch's thread pool made each
# GPTQ run of the tiny model ~10x slower (spinning on round() of 64-row columns)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pruned(tiny_model: Path, tiny_text: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, 2:4-pruned by the real command (Wanda)."""
    out = tmp_path_factory.mktemp("sparse") / "pruned"
    run_cli(
        "prune", str(tiny_model), "--method", "wanda", "--pattern", "2:4", "--calib",
        str(tiny_text), "--calib-samples", "8", "--calib-seqlen", "64", "-o", str(out),
        env=ONE_THREAD, check=True,
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def input_zeros(pruned: Path) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(pruned)
    return {n: ckpt.get(n) == 0 for n in select_tensors(ckpt, [])}


def quantize(src: Path, out: Path, **req: Any) -> tuple[JobResult, Recorder]:
    events = Recorder()
    return run_job(QuantizeJob(QuantizeRequest(**req)), str(src), output=out, events=events), events


def zeros_lost(out: Path, zeros: dict[str, torch.Tensor]) -> int:
    """Input zeros that the output decodes to something else (cllm's reader dequantizes
    GGUF blocks and compressed-tensors packs alike)."""
    ckpt = open_checkpoint(out)
    return sum(int((ckpt.get(n)[z] != 0).sum()) for n, z in zeros.items())


def test_input_is_really_2_4(input_zeros: dict[str, torch.Tensor]) -> None:
    assert len(input_zeros) == 14
    for z in input_zeros.values():
        assert z.float().mean() == 0.5
        assert int(z.reshape(z.shape[0], -1, 4).sum(-1).min()) == 2


CALIB = {"calib_samples": 8, "calib_seqlen": 64}


@pytest.mark.parametrize(
    ("req", "ext"),
    [
        ({"gguf_type": "Q4_0"}, ".gguf"),  # RTN through gguf-py: llama.cpp's reference rounding
        ({"method": "gptq", "gguf_type": "Q4_0"}, ".gguf"),
        ({"bits": 4, "group_size": 32}, ""),  # RTN, int4 symmetric, packed
        ({"method": "gptq", "bits": 4, "group_size": 32, "symmetric": False}, ""),
        ({"method": "awq", "awq_then": "gptq", "gguf_type": "Q8_0"}, ".gguf"),
    ],
    ids=["rtn-q4_0", "gptq-q4_0", "rtn-int4-sym", "gptq-int4-asym", "awq-gptq-q8_0"],
)
def test_zeros_survive_quantization(
    pruned: Path,
    input_zeros: dict[str, torch.Tensor],
    tiny_text: Path,
    tmp_path: Path,
    req: dict[str, Any],
    ext: str,
) -> None:
    if req.get("method") in ("gptq", "awq"):
        req = req | CALIB | {"calib": str(tiny_text)}
    out = tmp_path / f"q{ext}"
    result, events = quantize(pruned, out, **req)
    assert zeros_lost(out, input_zeros) == 0
    assert result.report["sparsity_kept"] is True and result.report["sparse_tensors"] == 14
    sparse = result.params["sparse_input"]
    assert sparse == {
        "tensors": 14,
        "sparse_tensors": 14,
        "sparsity": 0.5,
        "type_keeps_zeros": True,
    }
    assert not events.warnings
    assert any("zeros stay exactly zero" in m for m in events.logs)


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
def test_packed_zeros_survive_in_transformers(
    pruned: Path, input_zeros: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    """RTN int4 (symmetric) read by transformers' own compressed-tensors loader, not cllm's."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    out = tmp_path / "int4"
    quantize(pruned, out, bits=4, group_size=32)
    model = AutoModelForCausalLM.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    weights = model.state_dict()
    for name, z in input_zeros.items():
        assert int(z.sum()) > 0 and bool((weights[name][z] == 0).all()), name


def test_gptq_mask_beats_remasking(pruned: Path, calib: Any) -> None:
    """On real layer inputs: GPTQ holding the mask keeps the zeros and has less output
    error than plain GPTQ with its pruned weights zeroed afterwards (what one would do to
    restore sparsity by hand); plain GPTQ alone moves some pruned weights off zero."""
    from cllm.core.quantize.gptq import gptq_quantize
    from cllm.core.quantize.gptq_layerwise import collect_hessians
    from cllm.core.quantize.layerwise import LayerRunner, linear_modules

    runner = LayerRunner(open_checkpoint(pruned), compute_dtype="fp32")
    layer = runner.build_layer(0)
    linears = linear_modules(layer)
    accs = collect_hessians(runner, layer, runner.embed(calib.ids), linears)
    grid = GGUFGrid("Q4_0")

    def out_err(Q: torch.Tensor, W: torch.Tensor, H: torch.Tensor) -> float:
        d = Q - W
        return float(((d @ H) * d).sum())

    masked_err = remasked_err = 0.0
    plain_moved = 0
    for name, m in linears.items():
        W, H = m.weight.data.clone(), accs[name].H.clone()
        keep = W != 0
        masked = gptq_quantize(W, H.clone(), grid, act_order=True, mask=keep.float())
        plain = gptq_quantize(W, H.clone(), grid, act_order=True)
        assert bool((masked.weight[~keep] == 0).all()), name
        plain_moved += int((plain.weight[~keep] != 0).sum())
        masked_err += out_err(masked.weight, W, H)
        remasked_err += out_err(plain.weight * keep, W, H)
    assert plain_moved > 0
    assert masked_err < remasked_err


def test_warns_on_stderr_before_any_work(pruned: Path) -> None:
    """The CLI shows it, and before any work (so --dry-run shows it too)."""
    p = run_cli("quantize", str(pruned), "--gguf-type", "Q4_K_M", "--dry-run", env=ONE_THREAD)
    assert p.returncode == 0, p.stderr
    assert "warning:" in p.stderr and "but Q4_K_M cannot keep exact zeros" in p.stderr
    assert "Q4_0, Q5_0 or Q8_0" in p.stderr


def prepare(src: Path, **req: Any) -> tuple[dict[str, Any], Recorder]:
    from cllm.formats.inputs import resolve_input

    job = QuantizeJob(QuantizeRequest(**req))
    job.validate()
    events = Recorder()
    return job.prepare(resolve_input(str(src)), events), events


@pytest.mark.parametrize(
    ("req", "warned"),
    [
        ({"gguf_type": "Q4_1"}, "Q4_1"),
        ({"gguf_type": "IQ4_NL"}, "IQ4_NL"),
        ({"target_bpw": 5.0, "candidates": "Q4_0,Q4_K_M,Q5_1"}, "Q4_K_M/Q5_1"),
        ({"target_bpw": 5.0}, None),  # default candidates Q4_0,Q5_0,Q8_0 all keep zeros
        ({"gguf_type": "Q6_K"}, None),
        # asymmetric int grids keep zeros: an integer zero point, and a range that always
        # includes 0, so a zero weight decodes to scale * (zero - zero) = 0 (GPTQ's case is
        # checked above through the packed file)
        ({"symmetric": False}, None),
    ],
)
def test_which_requests_warn(pruned: Path, req: dict[str, Any], warned: str | None) -> None:
    params, events = prepare(pruned, **req)
    assert params["sparse_input"]["type_keeps_zeros"] is (warned is None)
    if warned is None:
        assert not events.warnings
    else:
        assert len(events.warnings) == 1 and f"but {warned} cannot keep" in events.warnings[0]


def test_llamacpp_fallback_reported(
    pruned: Path, input_zeros: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    """Q4_K_M is warned about, but on rows of 64 llama.cpp falls back to legacy types: the
    report says what the written file really does."""
    out = tmp_path / "k.gguf"
    result, events = quantize(pruned, out, gguf_type="Q4_K_M")
    assert any("Q4_K_M cannot keep exact zeros" in w for w in events.warnings)
    assert result.params["sparse_input"]["type_keeps_zeros"] is False
    assert result.report["sparsity_kept"] is (zeros_lost(out, input_zeros) == 0)


def test_dense_input_unchanged(tiny_model: Path, tmp_path: Path) -> None:
    """No sparsity entry for a dense model, so its provenance ids stay what they were."""
    result, events = quantize(tiny_model, tmp_path / "d.gguf", gguf_type="Q4_1")
    assert "sparse_input" not in result.params and "sparsity_kept" not in result.report
    assert not events.warnings


def test_quantized_zeros_are_not_pruning(tiny_model: Path, tmp_path: Path) -> None:
    """A Q4_0 file of a dense model decodes >10% of its weights to 0 (rounding, not
    pruning): requantizing it must not hold them as a mask."""
    out = tmp_path / "q4.gguf"
    quantize(tiny_model, out, gguf_type="Q4_0")
    ckpt = open_checkpoint(out)
    names = select_tensors(ckpt, [])
    frac = max(float((ckpt.get(n) == 0).float().mean()) for n in names)
    assert frac > SPARSE_MIN_ZEROS  # the trap is real
    assert not scan_sparse(ckpt, names).any
    assert MaskPolicy(ckpt).mask(names[0], ckpt.get(names[0])) is None


# -- which grids and types keep an exact zero: the claims of `holds_exact_zero`, measured --


def _sparse_matrix() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 256, generator=g) * 0.05
    w[torch.rand(w.shape, generator=g) < 0.5] = 0
    w[0, :32] = w[0, :32].abs()  # a block with no negative weight (min > 0 before clamping)
    return w


@pytest.mark.parametrize(
    "grid",
    [IntGrid(b, g, s) for b in (2, 4, 8) for g in (32, -1) for s in (True, False)]
    + [GGUFGrid(t) for t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")],
    ids=lambda g: g.describe(),
)
def test_grid_claims(grid: IntGrid | GGUFGrid) -> None:
    w = _sparse_matrix()
    codes, scales, zeros = quantize_rtn(w, grid, clip=True)
    deq = dequantize_groups(codes, scales, zeros, grid.group_width(w.shape[1]))
    kept = bool((deq[w == 0] == 0).all())
    assert kept is holds_exact_zero(grid)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0"])
def test_gguf_py_type_claims(qtype: str) -> None:
    """The writers cllm streams with gguf-py (RTN GGUF) round like llama.cpp's reference."""
    import gguf
    from gguf.quants import dequantize
    from gguf.quants import quantize as gquantize

    w = _sparse_matrix().numpy()
    t = getattr(gguf.GGMLQuantizationType, qtype)
    deq = dequantize(gquantize(w, t), t)
    kept = bool(np.all(deq[w == 0] == 0))
    assert kept is holds_exact_zero(qtype)


def test_file_type_claims() -> None:
    from cllm.core.quantize.api import Target

    assert holds_exact_zero(Target(symmetric=False)) and holds_exact_zero(Target(fake=True))
    assert not holds_exact_zero(Target(to="gguf", gguf_type="Q4_K_M"))
    assert not holds_exact_zero(Target(to="gguf", layer_types=["Q4_0", "Q5_1"]))
    for t in ("Q4_0", "Q5_0", "Q8_0", "Q6_K", "F16", "BF16", "TQ2_0"):
        assert holds_exact_zero(t), t
    for t in ("Q4_1", "Q5_1", "Q4_K_M", "Q5_K_S", "Q2_K", "Q3_K_M", "IQ4_NL", "IQ4_XS", "IQ2_XS"):
        assert not holds_exact_zero(t), t


def test_nm_pattern_rule() -> None:
    w = _sparse_matrix()
    assert nm_pattern(max_nonzeros_per_group((w != 0).numpy()), 0.5) is None  # unstructured
    two_four = torch.tensor([[1.0, 0, 2, 0, 0, 3, 4, 0]] * 2)
    counts = max_nonzeros_per_group((two_four != 0).numpy())
    assert counts == {4: 2, 8: 4}
    assert nm_pattern(counts, 0.5) == "2:4"
    assert nm_pattern({4: 4, 8: 8, 16: 16}, 0.0) is None  # dense
    assert nm_pattern({4: 4, 8: 4, 16: 8}, 0.5) == "4:8"
