"""Task evaluation: the lm-eval model class against direct computation on a tiny model, the
backends against each other, the local task configs against their files, and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cllm.formats.checkpoint import open_checkpoint
from tests.conftest import cli_in_process

pytest.importorskip("lm_eval")


def _direct_logprobs(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    """log p(ids[i] | ids[:i]) for i >= 1, from one plain forward pass."""
    with torch.inference_mode():
        logits = model(torch.as_tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, dim=-1)
    return np.array([float(lp[i - 1, ids[i]]) for i in range(1, len(ids))])


@pytest.fixture(scope="module")
def torch_model(tiny_model: Path):  # noqa: ANN201
    from cllm.core.eval.backends import build_torch_model

    return build_torch_model(open_checkpoint(tiny_model))


def _groups(seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    groups = []
    for n_prefix in (0, 5, 17):
        prefix = rng.integers(0, 256, n_prefix).tolist()
        tails = []
        for n_tail in (1, 3, 6):
            tail = rng.integers(0, 256, n_tail).tolist()
            tails.append((tail, rng.integers(0, 256, n_tail).tolist()))
        groups.append((prefix, tails))
    return groups


def _direct_scores(model: torch.nn.Module, groups: list) -> list:
    out = []
    for prefix, tails in groups:
        row = []
        for tail, target in tails:
            with torch.inference_mode():
                logits = model(torch.as_tensor([prefix + tail])).logits[0].double()
            lp = torch.log_softmax(logits[len(prefix) :], dim=-1)
            idx = torch.as_tensor(target)
            total = float(lp[torch.arange(len(target)), idx].sum())
            greedy = bool((lp.argmax(dim=-1) == idx).all())
            row.append((total, greedy))
        out.append(row)
    return out


def test_torch_and_llamacpp_scores_equal_direct_computation(tiny_model: Path, torch_model) -> None:  # noqa: ANN001
    """Each backend's (sum log p, greedy) per tail equals a plain forward pass: llama.cpp
    reuses the prefix in its KV cache and computes only the tail's logit rows."""
    from cllm.core.tasks.scoring import torch_score
    from cllm.core.tasks.sessions import open_scorer

    groups = _groups()
    want = _direct_scores(torch_model, groups)
    got = torch_score(torch_model, groups, batch_size=4)
    for w_row, g_row in zip(want, got, strict=True):
        for (w, wg), (g, gg) in zip(w_row, g_row, strict=True):
            assert g == pytest.approx(w, abs=1e-4) and gg == wg
    scorer = open_scorer(open_checkpoint(tiny_model), "llama.cpp", 64, 2, 8)
    try:
        # twice, the second time with the prefixes already cached
        for _ in range(2):
            got = scorer.score(groups)
            for w_row, g_row in zip(want, got, strict=True):
                for (w, _wg), (g, _gg) in zip(w_row, g_row, strict=True):
                    assert g == pytest.approx(w, abs=2e-3 * max(1.0, abs(w)))
    finally:
        scorer.close()


def _instance(kind: str, args: tuple):  # noqa: ANN202
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_model_class_loglikelihoods_equal_direct_computation(tiny_model: Path, torch_model) -> None:  # noqa: ANN001
    from transformers import AutoTokenizer

    from cllm.core.tasks.lm import CllmLM
    from cllm.core.tasks.sessions import TorchTaskSession

    ckpt = open_checkpoint(tiny_model)
    tok = AutoTokenizer.from_pretrained(str(ckpt.tokenizer_dir()))
    lm = CllmLM(TorchTaskSession(ckpt), tok, max_length=64, batch_size=3)
    pairs = [("the cat sat on", " the mat"), ("the cat sat on", " a tree"),
             ("under the", " garden and then"), ("", "the cat")]  # fmt: skip
    got = lm.loglikelihood([_instance("loglikelihood", p) for p in pairs])
    for (ctx, cont), (ll, _greedy) in zip(pairs, got, strict=True):
        c = tok.encode(ctx) if ctx else [tok.eos_token_id]  # lm-eval's prefix token
        ids = c + tok.encode(cont)
        want = _direct_logprobs(torch_model, ids)[len(c) - 1 :].sum()
        assert ll == pytest.approx(want, abs=1e-4)

    # rolling: the whole text's log-likelihood, in one window here (the perplexity path)
    text = "the cat sat on a mat and then ran in the garden under the tree"
    (rolling,) = lm.loglikelihood_rolling([_instance("loglikelihood_rolling", (text,))])
    ids = [tok.eos_token_id, *tok.encode(text)]
    assert rolling == pytest.approx(_direct_logprobs(torch_model, ids).sum(), abs=1e-4)
    # and across windows: max_length 8 gives disjoint windows, each conditioned on 1 token
    lm._max_length = 8
    (windows,) = lm.loglikelihood_rolling([_instance("loglikelihood_rolling", (text,))])
    assert math.isfinite(windows) and windows != pytest.approx(rolling, abs=1e-3)


# rows per local file, from the data README
COUNTS = {"arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "piqa": 1838,
          "winogrande": 1267, "lambada_openai": 5153, "openbookqa": 500, "copa": 100}  # fmt: skip


@pytest.mark.parametrize("name", list(COUNTS))
def test_local_task_configs_read_their_files(name: str) -> None:
    """lm-eval builds each task from cllm's config: every item, gold labels in range, and
    prompts in lm-eval's form."""
    from lm_eval.api.task import ConfigurableTask

    from cllm.core.tasks.local import task_config

    spec, hashes = task_config(name, None)
    assert len(next(iter(hashes.values()))) == 64
    task = ConfigurableTask(config=spec)
    docs = list(task.test_docs())
    assert len(docs) == COUNTS[name]
    doc = docs[0]
    if task.OUTPUT_TYPE == "multiple_choice":
        choices = task.doc_to_choice(doc)
        # winogrande scores the gold *context*: its index is what doc_to_text gives
        gold_of = task.doc_to_text if name == "winogrande" else task.doc_to_target
        golds = [gold_of(d) for d in docs[:200]]
        assert len(choices) >= 2 and all(0 <= int(g) < len(choices) for g in golds)
        assert len(set(golds)) > 1  # not a constant column
    text = task.doc_to_text(doc)
    if name.startswith("arc") or name == "piqa":
        assert text.startswith("Question: ") and text.endswith("\nAnswer:")
    if name == "lambada_openai":
        assert task.doc_to_target(doc).startswith(" ") and not text.endswith(" ")
    if name == "winogrande":
        assert text in (0, 1)  # lm-eval's partial scoring: the gold context's index


def test_cli_tasks_agree_across_backends_and_refuse_bad_names(tiny_model: Path) -> None:
    records = {}
    for backend in ("torch", "llama.cpp"):
        p = cli_in_process("eval", str(tiny_model), "-b", backend, "--tasks", "arc_easy,winogrande",
                           "--limit", "8", "--json")  # fmt: skip
        assert p.returncode == 0, p.stderr
        records[backend] = json.loads(p.stdout)
    t, ll = records["torch"]["tasks"], records["llama.cpp"]["tasks"]
    assert t["arc_easy"]["samples"] == 8 and set(t) == {"arc_easy", "winogrande"}
    for name in t:  # an F32 GGUF: llama.cpp ranks the choices as torch does
        assert ll[name]["acc"] == t[name]["acc"]
    prot = records["torch"]["tasks_protocol"]
    assert prot["lm_eval"] and set(prot["task_files_sha256"]) == {
        "arc_easy.jsonl",
        "winogrande.jsonl",
    }

    bad = cli_in_process("eval", str(tiny_model), "--tasks", "arc_easy,nosuchtask")
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and "nosuchtask" in lines[0]
    assert "Available: arc_easy" in lines[0]


def test_missing_task_data_says_where_it_looked(tiny_model: Path, tmp_path: Path) -> None:
    p = cli_in_process("eval", str(tiny_model), "--tasks", "piqa",
                       env={"CLLM_DATA_DIR": str(tmp_path)})  # fmt: skip
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1
    assert str(tmp_path / "tasks" / "piqa.jsonl") in lines[0] and "CLLM_DATA_DIR" in lines[0]


def test_llamacpp_scorer_packs_and_splits_like_one_pass(tiny_model: Path, torch_model) -> None:  # noqa: ANN001
    """With an 8-token batch every group is larger than a batch (prefix and tails in parts),
    with a 64-token one several groups share a decode: the scores are the same; greedy
    generation follows torch's."""
    from cllm.core.eval.backends import gguf_for_llamacpp
    from cllm.core.tasks.scoring import LlamaCppScorer
    from cllm.core.tasks.sessions import LlamaCppTaskSession, TorchTaskSession

    ckpt = open_checkpoint(tiny_model)
    session = LlamaCppTaskSession(str(gguf_for_llamacpp(ckpt)), 64, 2)
    try:
        groups = _groups(1)
        want = _direct_scores(torch_model, groups)
        for n_batch in (8, 64):
            session.scorer.close()
            session.scorer = LlamaCppScorer(session.llm, 64, n_batch)
            got = session.score(groups)
            for w_row, g_row in zip(want, got, strict=True):
                for (w, _), (g, _) in zip(w_row, g_row, strict=True):
                    assert g == pytest.approx(w, abs=2e-3 * max(1.0, abs(w))), n_batch
        prompt = [5, 9, 14, 3, 7, 11]
        assert session.generate(prompt, 12, []) == TorchTaskSession(ckpt).generate(prompt, 12, [])
    finally:
        session.close()


def test_fail_under_task_metrics(tiny_model: Path) -> None:
    """METRIC=X bars: exit 3 below the bar; a metric no chosen task reports, or a bar that is
    not METRIC=X, is exit 2 before any work."""
    base = ["eval", str(tiny_model), "--tasks", "arc_easy", "--limit", "4"]
    ok = cli_in_process(*base, "--fail-under", "acc=0,arc_easy.acc_norm=0")
    assert ok.returncode == 0, ok.stderr
    low = cli_in_process(*base, "--fail-under", "acc=1.01")
    assert (
        low.returncode == 3
        and "arc_easy acc" in low.stderr
        and "below --fail-under 1.01" in low.stderr
    )
    for bar, needle in (("f1=0.5", "none of these tasks reports"),
                        ("piqa.acc=0.5", "not in --tasks"), ("acc", "is not METRIC=X")):  # fmt: skip
        bad = cli_in_process(*base, "--fail-under", bar)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1 and needle in lines[0], bad.stderr
