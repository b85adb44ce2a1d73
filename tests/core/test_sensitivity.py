"""Sensitivity measurement and bit allocation on the tiny model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cllm.core.eval.data import load_tokens, make_chunks
from cllm.core.quantize.sensitivity import (
    TYPE_BPW,
    SensitivityReport,
    allocate,
    measure_sensitivity,
)
from cllm.errors import UsageError
from cllm.formats.checkpoint import open_checkpoint


@pytest.fixture(scope="module")
def report(tiny_model: Path, tiny_text: Path) -> SensitivityReport:
    ckpt = open_checkpoint(tiny_model)
    chunks = make_chunks(load_tokens(tiny_text, ckpt.tokenizer_dir()).ids, 64, 4)
    return measure_sensitivity(ckpt, chunks, ["Q4_0", "Q5_0", "Q8_0"])


def test_more_bits_means_less_kld(report: SensitivityReport) -> None:
    k = np.array(report.kld)
    assert k.shape == (2, 3)
    assert np.all(k > 0)
    assert np.all(k[:, 0] > k[:, 1]) and np.all(k[:, 1] > k[:, 2])  # Q4_0 > Q5_0 > Q8_0
    # q 64x64, k and v 32x64 (2 kv heads of 16), o 64x64, gate/up 128x64, down 64x128
    assert report.layer_params == [36864, 36864]


def test_allocation_respects_budget_and_spends_it_well(report: SensitivityReport) -> None:
    params = sum(report.layer_params)
    for bpw in (4.5, 5.5, 6.5, 8.5):
        types = allocate(report, bpw * params)
        used = sum(p * TYPE_BPW[t] for p, t in zip(report.layer_params, types, strict=True))
        assert used <= bpw * params + 1e-6
    assert allocate(report, 4.5 * params) == ["Q4_0", "Q4_0"]
    assert allocate(report, 8.5 * params) == ["Q8_0", "Q8_0"]
    # with room for one upgrade, the more sensitive layer gets it
    k = np.array(report.kld)
    mid = allocate(report, (4.5 + 4.0 / 2) * params)
    sensitive = int(np.argmax(k[:, 0] - k[:, 2]))
    assert mid[sensitive] != "Q4_0"
    with pytest.raises(UsageError, match="budget"):
        allocate(report, 4.0 * params)


def test_report_round_trips_and_plots(report: SensitivityReport, tmp_path: Path) -> None:
    back = SensitivityReport.from_dict(report.to_dict())
    assert back == report
    from cllm.core.quantize.sensitivity import heatmap_png

    out = tmp_path / "heat.png"
    heatmap_png(report, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_int_candidates_map_sensitivity_but_cannot_be_mixed(
    tiny_model: Path, tiny_text: Path, report: SensitivityReport
) -> None:
    """INT3 (3-bit, group 128) is measured for a heat map: fewer bits, more KLD, in every
    layer; mixed precision refuses it (it allocates llama.cpp types by their storage cost)."""
    from cllm.core.quantize.sensitivity import check_candidates

    ckpt = open_checkpoint(tiny_model)
    chunks = make_chunks(load_tokens(tiny_text, ckpt.tokenizer_dir()).ids, 64, 4)
    ints = measure_sensitivity(ckpt, chunks, ["INT3", "INT8G32"])
    k = np.array(ints.kld)
    assert k.shape == (2, 2) and np.all(k[:, 0] > 10 * k[:, 1])
    assert np.all(k[:, 0] > np.array(report.kld)[:, 0])  # 3-bit is worse than Q4_0
    with pytest.raises(UsageError, match="not a llama.cpp type"):
        check_candidates(["Q4_0", "INT3"], mixed=True)
    with pytest.raises(UsageError, match="INT9 is not supported"):
        check_candidates(["INT9"])
