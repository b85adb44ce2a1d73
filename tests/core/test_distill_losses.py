"""Distillation losses against hand computation, and the top-k teacher cache."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cllm.core.distill import losses as L
from cllm.core.distill.config import DistillConfig, parse_init, parse_layer_map
from cllm.core.distill.loop import layer_pairs, lr_lambda
from cllm.core.distill.teacher import TopKCache
from cllm.errors import InputError, UsageError


def _np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return (p * (np.log(p) - np.log(q))).sum(-1)


@pytest.fixture
def logits() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 5, 11, generator=g) * 2, torch.randn(2, 5, 11, generator=g) * 2


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_and_reverse_kl_match_hand_computation(logits, temperature):
    t, s = logits
    p = _np_softmax(t.numpy() / temperature)
    q = _np_softmax(s.numpy() / temperature)
    fkl = L.full_vocab_loss("fkl", t, s, temperature)
    rkl = L.full_vocab_loss("rkl", t, s, temperature)
    assert float(fkl) == pytest.approx(temperature**2 * _np_kl(p, q).mean(), rel=1e-5)
    assert float(rkl) == pytest.approx(temperature**2 * _np_kl(q, p).mean(), rel=1e-5)
    assert float(fkl) != pytest.approx(float(rkl), rel=1e-3)  # they are different losses


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalised_jsd_matches_hand_computation(logits, beta):
    t, s = logits
    p, q = _np_softmax(t.numpy()), _np_softmax(s.numpy())
    m = beta * p + (1 - beta) * q
    want = (beta * _np_kl(p, m) + (1 - beta) * _np_kl(q, m)).mean()
    assert float(L.full_vocab_loss("jsd", t, s, 1.0, beta)) == pytest.approx(want, rel=1e-5)


def test_divergences_vanish_for_identical_distributions(logits):
    t, _ = logits
    for kind in L.DIVERGENCES:
        assert abs(float(L.full_vocab_loss(kind, t, t.clone(), 1.0))) < 1e-6


def test_topk_with_every_token_equals_full_vocabulary(logits):
    t, s = logits
    values, ids = L.teacher_topk(t, t.shape[-1], 1.0)
    for kind in L.DIVERGENCES:
        full = L.full_vocab_loss(kind, t, s, 1.0)
        top = L.topk_loss(kind, values, ids, s, 1.0)
        assert float(top) == pytest.approx(float(full), rel=1e-4, abs=1e-6)


def test_topk_is_the_kl_of_the_coarsened_distributions(logits):
    t, s = logits
    k = 3
    values, ids = L.teacher_topk(t, k, 1.0)
    p, q = _np_softmax(t.numpy()), _np_softmax(s.numpy())
    idx = ids.numpy()
    pk = np.take_along_axis(p, idx, -1)
    qk = np.take_along_axis(q, idx, -1)
    pc = np.concatenate([pk, 1 - pk.sum(-1, keepdims=True)], -1)
    qc = np.concatenate([qk, 1 - qk.sum(-1, keepdims=True)], -1)
    want = _np_kl(pc, qc).mean()
    got = float(L.topk_loss("fkl", values, ids, s, 1.0))
    assert got == pytest.approx(want, rel=1e-4)
    # never more than the full divergence (data-processing inequality)
    assert got <= float(L.full_vocab_loss("fkl", t, s, 1.0)) + 1e-6


def test_tail_bucket_holds_the_missing_mass(logits):
    t, _ = logits
    values, _ids = L.teacher_topk(t, 4, 1.0)
    coarse = L.coarsen_teacher(values).exp()
    assert torch.allclose(coarse.sum(-1), torch.ones(coarse.shape[:-1]), atol=1e-5)
    assert bool((coarse[..., -1] > 0).all())


def test_hidden_losses():
    a = torch.randn(2, 3, 8)
    assert float(L.hidden_loss("mse", a, a)) == 0.0
    assert float(L.hidden_loss("cosine", a, 3 * a)) == pytest.approx(0.0, abs=1e-6)
    assert float(L.hidden_loss("cosine", a, -a)) == pytest.approx(2.0, abs=1e-5)
    assert float(L.hidden_loss("mse", a, a + 1)) == pytest.approx(1.0, abs=1e-6)


def test_attention_loss_is_kl_over_keys():
    att = torch.softmax(torch.randn(1, 2, 4, 4), -1)
    other = torch.softmax(torch.randn(1, 2, 4, 4), -1)
    assert float(L.attention_loss(att, att)) == pytest.approx(0.0, abs=1e-6)
    want = _np_kl(att.numpy(), other.numpy()).mean()
    assert float(L.attention_loss(other, att)) == pytest.approx(want, rel=1e-5)


def test_cross_entropy_matches_torch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 9, generator=g)
    labels = torch.randint(0, 9, (2, 6), generator=g)
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 9), labels.reshape(-1))
    assert float(L.cross_entropy(logits, labels)) == pytest.approx(float(want), rel=1e-6)


def test_topk_cache_round_trip_and_key(tmp_path, logits):
    t, _ = logits

    class FakeTeacher:  # logits as a teacher module would give them, counted
        calls = 0

        def __call__(self, ids, hidden=False, attentions=False):
            from cllm.core.distill.teacher import TeacherOutput

            FakeTeacher.calls += 1
            return TeacherOutput(t[: len(ids)], None, None)

    key = {
        "teacher_sha256": "a" * 64,
        "data_sha256": "b" * 64,
        "seqlen": 5,
        "top_k": 3,
        "temperature": 1.0,
    }
    cache = TopKCache(tmp_path / "c", key)
    ids = torch.zeros(2, 5, dtype=torch.long)
    first = cache.get([7, 9], ids, FakeTeacher(), 1.0)
    assert cache.misses == 2 and FakeTeacher.calls == 1
    again = TopKCache(tmp_path / "c", key).get([7, 9], ids, None, 1.0)  # no teacher needed
    values, idx = L.teacher_topk(t, 3, 1.0)
    assert torch.equal(again.top_ids, idx) and torch.equal(first.top_ids, idx)
    assert torch.allclose(again.top_logp, values, atol=2e-3)  # stored as float16
    assert json.loads((tmp_path / "c" / "cache.json").read_text())["top_k"] == 3
    with pytest.raises(InputError, match=r"other settings \(top_k 3 -> 4\)"):
        TopKCache(tmp_path / "c", {**key, "top_k": 4})
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="did not write"):
        TopKCache(tmp_path / "foreign", key)
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


def test_layer_map_shapes():
    cfg = DistillConfig(hidden_loss="mse")
    assert layer_pairs(cfg, 4, 4, None) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    uniform = layer_pairs(cfg, 26, 30, None)
    assert len(uniform) == 26 and uniform[-1] == (25, 29)
    teachers = [t for _s, t in uniform]
    assert teachers == sorted(teachers) and len(set(teachers)) == 26
    assert layer_pairs(cfg, 3, 30, None) == [(0, 9), (1, 19), (2, 29)]
    assert layer_pairs(cfg, 3, 8, [0, 4, 7]) == [(0, 0), (1, 4), (2, 7)]
    explicit = DistillConfig(hidden_loss="mse", layer_map="0:1,1:3")
    assert layer_pairs(explicit, 2, 4, None) == [(0, 1), (1, 3)]
    with pytest.raises(UsageError, match="outside"):
        layer_pairs(DistillConfig(hidden_loss="mse", layer_map="0:9"), 2, 4, None)


def test_parsers():
    assert parse_layer_map("0:0, 1:2") == [(0, 0), (1, 2)]
    assert parse_init("layers:0,2,4-6") == [0, 2, 4, 5, 6]
    assert parse_init(None) is None
    for bad in ("layers:", "blocks:1", "layers:3-1", "layers:a"):
        with pytest.raises(UsageError):
            parse_init(bad)
    with pytest.raises(UsageError, match="twice"):
        parse_layer_map("0:1,0:2")


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = DistillConfig(steps=100, warmup=10, min_lr=0.1)
    f = lr_lambda(cfg)
    assert f(0) < f(5) < f(9) <= 1.0
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(100) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"loss": "kl"}, "--loss"),
        ({"beta": 1.0}, "--beta"),
        ({"alpha": 1.5}, "--alpha"),
        ({"temperature": 0}, "--temperature"),
        ({"hidden_loss": "l1"}, "--hidden-loss"),
        ({"teacher_cache": "x"}, "stores the teacher.s top-k"),
        ({"teacher_cache": "x", "top_k": 8, "hidden_loss": "mse"}, "logits only"),
        ({"freeze": ["("]}, "regular expression"),
        ({"warmup": 300}, "--warmup"),
        ({"lora_rank": 4, "freeze": ["x"]}, "adapters"),
    ],
)
def test_config_refusals(bad, match):
    with pytest.raises(UsageError, match=match):
        DistillConfig(**bad).validate()
