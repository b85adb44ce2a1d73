"""The training loop's knobs on tiny models: accumulation, attention transfer, bf16."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.conftest import cli_in_process
from tests.core.test_distill import distill, weights


@pytest.fixture(scope="module")
def student(tiny_model: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("loop") / "mlp50"
    proc = cli_in_process(
        "prune", str(tiny_model), "--structured", "mlp", "--ratio", "0.5", "-o", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    return out


def test_accumulating_two_half_batches_equals_one_batch(student, tiny_model, tmp_path):
    whole = distill(student, tiny_model, tmp_path / "b4", steps=4, batch_size=4)
    halves = distill(student, tiny_model, tmp_path / "b2x2", steps=4, batch_size=2, grad_accum=2)
    a = [h["loss"] for h in whole.report["losses"]]
    b = [h["loss"] for h in halves.report["losses"]]
    assert b == pytest.approx(a, rel=1e-5)
    wa, wb = weights(tmp_path / "b4"), weights(tmp_path / "b2x2")
    # Adam divides by the gradient's running scale, which magnifies float rounding where a
    # gradient is near zero; 1e-5 is still a small fraction of one step at lr 3e-3
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_attention_transfer_adds_its_term(student, tiny_model, tmp_path):
    res = distill(student, tiny_model, tmp_path / "att", steps=3, attn_weight=1.0)
    att = [h["attn"] for h in res.report["losses"]]
    assert all(a > 0 for a in att)
    losses = res.report["losses"]
    assert all(h["loss"] == pytest.approx(h["kd"] + h["attn"], rel=1e-5) for h in losses)


def test_bf16_compute_and_bf16_teacher_train_and_are_recorded(student, tiny_model, tmp_path):
    res = distill(
        student, tiny_model, tmp_path / "bf16", steps=3, precision="bf16", teacher_dtype="bf16"
    )
    assert res.report["precision"] == "bf16"
    assert all(math.isfinite(h["loss"]) for h in res.report["losses"])
    assert (
        res.params["config"]["precision"] == "bf16"
        and res.params["config"]["teacher_dtype"] == "bf16"
    )
    assert all(
        v.dtype == torch.float32 for v in weights(tmp_path / "bf16").values()
    )  # saved as input


def test_cross_entropy_only_needs_no_teacher_pass(student, tiny_model, tmp_path):
    res = distill(student, tiny_model, tmp_path / "ce", steps=3, alpha=0.0)
    losses = res.report["losses"]
    assert all(h["kd"] == 0.0 and h["loss"] == pytest.approx(h["ce"], rel=1e-6) for h in losses)


def test_hidden_states_are_layer_outputs_on_both_sides(tiny_model, tmp_path):
    """A one-layer student built from the teacher's layer 0: before any step its layer-0
    output is the teacher's exactly, although it is the student's last layer (transformers'
    hidden_states would hand the final norm's output there instead)."""
    res = distill(
        tiny_model, tiny_model, tmp_path / "h", steps=1, init_layers=[0], hidden_loss="mse"
    )
    assert [tuple(p) for p in res.report["layer_pairs"]] == [(0, 0)]
    assert res.report["losses"][0]["hidden"] == pytest.approx(0.0, abs=1e-10)


@pytest.mark.slow  # three training runs; CI runs the slow tests
def test_top_k_on_the_fly_trains_what_the_cache_trains(student, tiny_model, tmp_path):
    cached = distill(
        student, tiny_model, tmp_path / "c", steps=3, top_k=8, teacher_cache=str(tmp_path / "k")
    )
    live = distill(student, tiny_model, tmp_path / "l", steps=3, top_k=8)
    full = distill(student, tiny_model, tmp_path / "f", steps=3)
    a = [h["kd"] for h in cached.report["losses"]]
    assert [h["kd"] for h in live.report["losses"]] == pytest.approx(a, rel=1e-6)
    assert [h["kd"] for h in full.report["losses"]] != pytest.approx(a, rel=1e-3)


@pytest.mark.slow  # three training runs; CI runs the slow tests
def test_lora_is_seeded_and_refused_on_a_pruned_student(tiny_model, tmp_path):
    one = distill(tiny_model, tiny_model, tmp_path / "a", steps=2, lora_rank=2, alpha=0.5)
    two = distill(
        tiny_model, tiny_model, tmp_path / "b", steps=2, lora_rank=2, alpha=0.5, force=True
    )
    assert one.status == two.status == "written"
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    sparse = tmp_path / "sparse"
    assert (
        cli_in_process(
            "prune", str(tiny_model), "--method", "magnitude", "-o", str(sparse)
        ).returncode
        == 0
    )
    proc = cli_in_process(
        "distill", str(sparse), "-t", str(tiny_model), "--lora-rank", "2", "-o", str(tmp_path / "x")
    )
    assert proc.returncode == 2 and "--no-keep-sparsity" in proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--attn-weight", "1"], "same head count"),
        (["--hidden-loss", "mse", "--layer-map", "0:7"], "outside"),
        (["--top-k", "100000", "--teacher-cache", "CACHE"], "more than the vocabulary"),
        (["--eval-every", "1", "--eval-chunks", "100000"], "--eval-chunks 100000"),
    ],
)
def test_setup_refusals_come_before_anything_is_made(tiny_model, tmp_path, flags, message):
    heads = tmp_path / "heads"
    proc = cli_in_process(
        "prune", str(tiny_model), "--structured", "heads", "--ratio", "0.5", "-o", str(heads)
    )
    assert proc.returncode == 0, proc.stderr
    cache = tmp_path / "cache"
    flags = [str(cache) if f == "CACHE" else f for f in flags]
    proc = cli_in_process(
        "distill", str(heads), "-t", str(tiny_model), *flags, "-o", str(tmp_path / "out")
    )
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not cache.exists() and not (tmp_path / "out").exists()
