"""`cllm info --sparsity`: exact zeros overall, over the decoder layers' linear weights and per
layer, and the N:M pattern those weights follow (only when they really do)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cllm.cli import app
from cllm.core.info import inspect_checkpoint
from cllm.core.prune.masks import apply_mask, nm_mask, unstructured_mask
from cllm.core.quantize.methods import LINEAR_RE
from cllm.core.quantize.sparsity import nonzero_array
from cllm.formats.checkpoint import open_checkpoint

Transform = Callable[[str, torch.Tensor], torch.Tensor]


def variant(src: Path, dst: Path, transform: Transform) -> Path:
    """A copy of the tiny model with each decoder linear weight passed through `transform`."""
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    for name, t in state.items():
        if LINEAR_RE.search(name):
            state[name] = transform(name, t).contiguous()
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def layer(name: str) -> int:
    return int(name.split(".")[2])


def nm(n: int, m: int) -> Transform:
    return lambda _name, w: apply_mask(w, nm_mask(w.abs(), n, m))


def uneven(_name: str, w: torch.Tensor) -> torch.Tensor:
    """Layer 0 at 25%, layer 1 at 62.5%: whole numbers of weights per row of 64 or 128."""
    return apply_mask(w, unstructured_mask(w.abs(), 0.25 if layer(_name) == 0 else 0.625))


@pytest.fixture(scope="module")
def models(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("info-sparsity")
    return {
        "2:4": variant(tiny_model, root / "two-four", nm(2, 4)),
        "4:8": variant(tiny_model, root / "four-eight", nm(4, 8)),
        "uneven": variant(tiny_model, root / "uneven", uneven),
        # 2:4 except one tensor left dense (as `cllm prune --keep` does): no pattern
        "2:4-but-one": variant(
            tiny_model,
            root / "two-four-kept",
            lambda n, w: w if n.endswith("layers.1.mlp.down_proj.weight") else nm(2, 4)(n, w),
        ),
    }


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def expected(path: Path) -> tuple[float, float, list[float]]:
    """Overall, linear and per-layer sparsity counted directly, tensor by tensor."""
    ckpt = open_checkpoint(path)
    zeros = total = 0
    per: dict[int, list[int]] = {}
    for name in ckpt.tensor_infos():
        t = ckpt.get(name)
        z = int((t == 0).sum())
        zeros, total = zeros + z, total + t.numel()
        if LINEAR_RE.search(name):
            acc = per.setdefault(layer(name), [0, 0])
            acc[0] += z
            acc[1] += t.numel()
    lin = sum(a[0] for a in per.values()) / sum(a[1] for a in per.values())
    return zeros / total, lin, [per[i][0] / per[i][1] for i in sorted(per)]


def test_json_reports_exact_per_layer_sparsity_and_2_4(models: dict[str, Path]) -> None:
    rep = json.loads(cli("info", str(models["2:4"]), "--json"))
    overall, linear, layers = expected(models["2:4"])
    assert rep["nm_pattern"] == "2:4"
    assert rep["linear_sparsity"] == linear == 0.5
    assert rep["sparsity_layers"] == layers == [0.5, 0.5]
    assert rep["sparsity"] == pytest.approx(overall, abs=1e-12)


def test_dense_model_has_no_pattern(tiny_model: Path) -> None:
    rep = json.loads(cli("info", str(tiny_model), "--json"))
    assert rep["nm_pattern"] is None
    assert rep["linear_sparsity"] == 0.0 and rep["sparsity_layers"] == [0.0, 0.0]


def test_no_sparsity_leaves_the_fields_null(tiny_model: Path) -> None:
    rep = json.loads(cli("info", str(tiny_model), "--json", "--no-sparsity"))
    assert rep["sparsity"] is None and rep["linear_sparsity"] is None
    assert rep["sparsity_layers"] is None and rep["nm_pattern"] is None


def test_human_output_summarises_layers_and_lists_them_with_v(models: dict[str, Path]) -> None:
    _, linear, layers = expected(models["uneven"])
    assert layers == [0.25, 0.625]
    out = cli("info", str(models["uneven"]))
    assert f"linear sparsity  {linear * 100:.2f}% (no N:M pattern)" in out
    assert "min 25.00 / median 43.75 / max 62.50% (-v lists all 2)" in out
    verbose = cli("-v", "info", str(models["uneven"]))
    assert "per layer        25.0% 62.5%" in verbose
    uniform = cli("info", str(models["2:4"]))
    assert "50.00% (2:4 pattern)" in uniform and "50.00% in each of 2 layers" in uniform


@pytest.mark.parametrize(
    ("which", "pattern"), [("4:8", "4:8"), ("uneven", None), ("2:4-but-one", None)]
)
def test_pattern_only_when_every_group_follows_it(
    models: dict[str, Path], which: str, pattern: str | None
) -> None:
    rep = inspect_checkpoint(open_checkpoint(models[which]), with_hash=False)
    assert rep.nm_pattern == pattern
    _, linear, layers = expected(models[which])
    assert rep.linear_sparsity == pytest.approx(linear, abs=1e-12)
    assert rep.sparsity_layers == pytest.approx(layers, abs=1e-12)


def test_pattern_survives_q4_0(models: dict[str, Path], tmp_path: Path) -> None:
    """Q4_0 keeps the pruned zeros and rounds a few more kept weights to 0: still 2:4."""
    from cllm.core.job import run_job
    from cllm.core.quantize.job import QuantizeJob, QuantizeRequest

    out = tmp_path / "q.gguf"
    run_job(QuantizeJob(QuantizeRequest(gguf_type="Q4_0")), str(models["2:4"]), output=out)
    rep = inspect_checkpoint(open_checkpoint(out), with_hash=False)
    assert rep.nm_pattern == "2:4"
    assert rep.linear_sparsity is not None and rep.linear_sparsity > 0.5


def test_signed_zeros_and_bf16_count() -> None:
    t = torch.tensor([[0.0, -0.0, 1.0, -2.0]])
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert nonzero_array(t.to(dtype)).tolist() == [[False, False, True, True]]
