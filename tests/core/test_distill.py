"""`cllm distill` on tiny models: training moves the student toward the teacher, resume,
sparsity, projections, LoRA, layer subsets, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cllm.core.distill.config import DistillConfig
from cllm.core.distill.job import DistillJob, DistillRequest
from cllm.core.job import run_job
from tests.conftest import cli_in_process

# fp32 pinned: "auto" picks bf16 autocast on CPUs with AMX/AVX512-BF16, whose rounding would
# make the exact-equality tests below depend on the machine CI lands on
FAST = {
    "steps": 6,
    "batch_size": 4,
    "seqlen": 32,
    "lr": 3e-3,
    "warmup": 0,
    "save_every": 50,
    "precision": "fp32",
}


def distill(
    student: Path, teacher: Path, out: Path, resume: bool = False, on_step=None, force=False, **kw
):
    cfg = DistillConfig(**{**FAST, **kw})
    job = DistillJob(DistillRequest(str(teacher), cfg, resume=resume, on_step=on_step))
    return run_job(job, str(student), output=out, resume=resume, force=force)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def mlp_student(tiny_model: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("student") / "mlp25"
    proc = cli_in_process(
        "prune", str(tiny_model), "--structured", "mlp", "--ratio", "0.25", "-o", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    return out


def test_distillation_closes_the_gap_to_the_teacher(tiny_model, tmp_path):
    # a one-layer student of the two-layer teacher: a gap large enough to see closing
    res = distill(
        tiny_model,
        tiny_model,
        tmp_path / "one",
        steps=12,
        eval_every=12,
        eval_chunks=2,
        init_layers=[0],
    )
    losses = [h["kd"] for h in res.report["losses"]]
    assert len(losses) == 12 and max(losses[-3:]) < 0.75 * losses[0]
    evals = res.report["evals"]
    assert [e["step"] for e in evals] == [0, 12] and evals[-1]["kld"] < 0.6 * evals[0]["kld"]


def test_output_keeps_the_architecture_and_records_provenance(mlp_student, tiny_model, tmp_path):
    res = distill(mlp_student, tiny_model, tmp_path / "out")
    losses = [h["kd"] for h in res.report["losses"]]
    before, after = weights(mlp_student), weights(tmp_path / "out")
    assert before.keys() == after.keys()
    assert all(before[k].shape == after[k].shape for k in before)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (
        cfg["intermediate_size"]
        == json.loads((mlp_student / "config.json").read_text())["intermediate_size"]
    )
    prov = json.loads(load_file_meta(tmp_path / "out")["cllm.provenance"])
    assert prov["op"] == "distill" and len(prov["params"]["teacher"]["sha256"]) == 64
    assert prov["result"]["final"]["kd"] == pytest.approx(losses[-1])
    assert not any(p.name.endswith(".cllm-state") for p in tmp_path.iterdir())  # state removed


def load_file_meta(folder: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return f.metadata()


def test_resume_reproduces_the_uninterrupted_run(mlp_student, tiny_model, tmp_path):
    whole = distill(mlp_student, tiny_model, tmp_path / "whole", save_every=3)

    def stop(step: int, _losses: dict) -> None:
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(mlp_student, tiny_model, tmp_path / "cut", save_every=3, on_step=stop)
    assert not (tmp_path / "cut").exists()  # no partial output
    assert (tmp_path / ".cut.cllm-state" / "step-000003").is_dir()
    resumed = distill(mlp_student, tiny_model, tmp_path / "cut", save_every=3, resume=True)
    assert resumed.report["resumed_from"] == 3
    a = [h["loss"] for h in whole.report["losses"]]
    b = [h["loss"] for h in resumed.report["losses"]]
    assert len(b) == 6 and b == pytest.approx(a, rel=1e-5)
    wa, wb = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_resume_with_other_settings_is_refused_with_the_difference(
    mlp_student, tiny_model, tmp_path
):
    def stop(step: int, _losses: dict) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(mlp_student, tiny_model, tmp_path / "o", save_every=2, on_step=stop)
    proc = cli_in_process(
        "distill", str(mlp_student), "--teacher", str(tiny_model), "-o", str(tmp_path / "o"),
        "--steps", "6", "--batch-size", "4", "--seqlen", "32", "--lr", "0.001", "--warmup", "0",
        "--save-every", "2", "--resume",
    )  # fmt: skip
    assert proc.returncode == 2
    assert "config.lr 0.003 -> 0.001" in proc.stderr and proc.stderr.count("\n") == 1
    assert (tmp_path / ".o.cllm-state").is_dir()  # the saved state is left alone


def test_masked_updates_keep_a_pruned_students_zeros(tiny_model, tmp_path):
    sparse = tmp_path / "wanda"
    proc = cli_in_process(
        "prune", str(tiny_model), "--method", "magnitude", "--sparsity", "0.5", "-o", str(sparse)
    )
    assert proc.returncode == 0, proc.stderr
    distill(sparse, tiny_model, tmp_path / "kept")
    distill(sparse, tiny_model, tmp_path / "dense", keep_sparsity=False)
    before, kept, dense = weights(sparse), weights(tmp_path / "kept"), weights(tmp_path / "dense")
    pruned = [k for k, v in before.items() if v.dim() == 2 and float((v == 0).float().mean()) > 0.4]
    assert pruned
    for k in pruned:
        zeros = before[k] == 0
        assert bool((kept[k][zeros] == 0).all()), k
        assert not torch.equal(kept[k], before[k])  # the kept weights did train
    assert any(bool((dense[k][before[k] == 0] != 0).any()) for k in pruned)


def test_projection_when_widths_differ_is_dropped_from_the_output(tiny_model, tmp_path):
    narrow = tmp_path / "narrow"
    proc = cli_in_process(
        "prune", str(tiny_model), "--structured", "hidden", "--ratio", "0.25", "-o", str(narrow)
    )
    assert proc.returncode == 0, proc.stderr
    res = distill(narrow, tiny_model, tmp_path / "out", hidden_loss="cosine")
    assert res.report["layer_pairs"] == [[0, 0], [1, 1]] or res.report["layer_pairs"] == [
        (0, 0),
        (1, 1),
    ]
    hidden = [h["hidden"] for h in res.report["losses"]]
    assert all(h > 0 for h in hidden) and hidden[-1] < hidden[0]
    assert weights(tmp_path / "out").keys() == weights(narrow).keys()  # no projection saved


def test_init_from_a_subset_of_layers_and_lora(tiny_model, tmp_path):
    res = distill(tiny_model, tiny_model, tmp_path / "one", init_layers=[1], hidden_loss="mse")
    cfg = json.loads((tmp_path / "one" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1
    assert [tuple(p) for p in res.report["layer_pairs"]] == [(0, 1)]
    out = weights(tmp_path / "one")
    assert "model.layers.0.mlp.up_proj.weight" in out and not any("layers.1." in k for k in out)

    lora = distill(tiny_model, tiny_model, tmp_path / "lora", lora_rank=4, alpha=0.5)
    assert lora.status == "written"
    before, after = weights(tiny_model), weights(tmp_path / "lora")
    assert before.keys() == after.keys()  # merged: no adapter tensors
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(".layers." in k for k in changed)  # adapters sit on layer linears only


def test_freeze_leaves_those_weights_untouched(mlp_student, tiny_model, tmp_path):
    distill(
        mlp_student, tiny_model, tmp_path / "f", freeze=[r"embed_tokens", r"layers\.0\."], alpha=0.5
    )
    before, after = weights(mlp_student), weights(tmp_path / "f")
    for k in before:
        frozen = "embed_tokens" in k or "layers.0." in k
        assert torch.equal(before[k], after[k]) == frozen, k


def test_teacher_cache_is_filled_once_and_reused(mlp_student, tiny_model, tmp_path):
    cache = tmp_path / "logits"
    first = distill(mlp_student, tiny_model, tmp_path / "a", top_k=16, teacher_cache=str(cache))
    assert (
        first.report["teacher_cache"]["misses"] == 24 and first.report["teacher_cache"]["hits"] == 0
    )
    again = distill(mlp_student, tiny_model, tmp_path / "b", top_k=16, teacher_cache=str(cache))
    assert again.report["teacher_cache"] == {"hits": 24, "misses": 0}
    assert first.report["teacher_loaded"] and not again.report["teacher_loaded"]
    assert [h["loss"] for h in again.report["losses"]] == pytest.approx(
        [h["loss"] for h in first.report["losses"]], rel=1e-6
    )
    proc = cli_in_process(
        "distill", str(mlp_student), "--teacher", str(tiny_model), "--steps", "2", "--seqlen", "64",
        "--top-k", "16", "--teacher-cache", str(cache), "-o", str(tmp_path / "c"),
    )  # fmt: skip
    assert proc.returncode == 2 and "seqlen 32 -> 64" in proc.stderr
    assert not (tmp_path / "c").exists()


def test_refusals(tiny_model, mlp_student, tiny_ggufs, tmp_path):
    from cllm.testing.tiny import save_tiny_llama

    other = save_tiny_llama(tmp_path / "wide-vocab", vocab_size=320)
    proc = cli_in_process(
        "distill", str(mlp_student), "--teacher", str(other), "-o", str(tmp_path / "x")
    )
    assert proc.returncode == 2
    assert "vocabulary of 264 tokens and the teacher" in proc.stderr and "320" in proc.stderr

    proc = cli_in_process(
        "distill", str(tiny_ggufs["Q8_0"]), "--teacher", str(tiny_model), "-o", str(tmp_path / "x")
    )
    assert (
        proc.returncode == 2 and "quantized (Q8_0)" in proc.stderr and "--dequantize" in proc.stderr
    )

    short = tmp_path / "short.txt"
    short.write_text("a few words only\n")
    proc = cli_in_process(
        "distill",
        str(mlp_student),
        "--teacher",
        str(tiny_model),
        "--data",
        str(short),
        "-o",
        str(tmp_path / "x"),
    )
    assert proc.returncode == 2 and "fewer than one batch" in proc.stderr

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    proc = cli_in_process(
        "distill", str(mlp_student), "--teacher", str(tiny_model), "--steps", "1", "-o", str(mine)
    )
    assert proc.returncode == 2 and (mine / "notes.txt").read_text() == "keep"
    assert not (tmp_path / "x").exists()
    for line in (proc.stderr,):
        assert "Traceback" not in line


def test_dry_run_and_reuse_print_the_same_path(mlp_student, tiny_model, tmp_path):
    args = [
        "distill",
        str(mlp_student),
        "--teacher",
        str(tiny_model),
        "--steps",
        "2",
        "--seqlen",
        "32",
        "-o",
        str(tmp_path / "s"),
    ]
    planned = cli_in_process(*args, "--dry-run")
    assert planned.returncode == 0 and planned.stdout.strip() == str(tmp_path / "s")
    assert not (tmp_path / "s").exists()
    first = cli_in_process(*args)
    second = cli_in_process(*args)
    assert first.stdout == second.stdout == planned.stdout
    assert "up to date" in second.stderr


@pytest.mark.slow  # two launched processes (about 30 s); CI runs the slow tests
def test_two_process_accelerate_run_matches_one_process(mlp_student, tiny_model, tmp_path):
    """DDP over two CPU processes (gloo) with the same global batch gives the student one
    process gives. accelerate's `--cpu` launcher needs MPI for several processes; its
    torchrun launcher (`--multi_gpu`) starts them without, and cllm joins them on gloo."""
    import os
    import subprocess
    import sys

    one = distill(mlp_student, tiny_model, tmp_path / "one", steps=4)
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", "29517", "-m", "cllm", "distill", str(mlp_student),
        "--teacher", str(tiny_model), "--steps", "4", "--batch-size", "4", "--seqlen", "32",
        "--lr", "0.003", "--warmup", "0", "--precision", "fp32", "-o", str(tmp_path / "two"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines() == [str(tmp_path / "two")]  # rank 0 alone prints
    prov = json.loads(load_file_meta(tmp_path / "two")["cllm.provenance"])
    assert prov["result"]["processes"] == 2
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert prov["result"]["final"]["loss"] == pytest.approx(one.report["final"]["loss"], rel=1e-5)
