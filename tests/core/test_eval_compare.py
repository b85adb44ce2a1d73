"""`cllm eval BASE CAND...`: one base pass, one record per candidate, KLD across formats and
backends, candidates the base cannot be compared with refused up front, --show-worst."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cllm.core.eval.compare import CompareRequest, compare
from cllm.core.eval.perplexity import EvalConfig
from cllm.core.export import OnnxExportConfig, export
from cllm.errors import InputError, UsageError
from cllm.formats.checkpoint import open_checkpoint
from cllm.formats.provenance import make_provenance
from cllm.testing.tiny import save_tiny_llama
from tests.conftest import cli_in_process

CTX = 64


@pytest.fixture(scope="module")
def candidates(
    tiny_model: Path, tiny_ggufs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The tiny model as an F32 GGUF, a Q4_0 GGUF and an fp32 ONNX export."""
    ckpt = open_checkpoint(tiny_model)
    onnx = tmp_path_factory.mktemp("compare") / "tiny.fp32.onnx"
    export(
        ckpt, OnnxExportConfig(), onnx, make_provenance("export", {"to": "onnx"}, ckpt.sha256, None)
    )
    return {"F32": tiny_ggufs["F32"], "Q4_0": tiny_ggufs["Q4_0"], "onnx": onnx}


def _req(tiny_text: Path, names: list[str], **kw: object) -> CompareRequest:
    cfg = EvalConfig(text=str(tiny_text), ctx=CTX, chunks=3)
    return CompareRequest(names, cfg, **kw)  # type: ignore[arg-type]


def test_kld_is_zero_across_formats_and_backends(
    tiny_model: Path, tiny_text: Path, candidates: dict[str, Path]
) -> None:
    """An F32 GGUF (llama.cpp) and an fp32 ONNX export (onnxruntime) of a safetensors base
    give KLD ~ 0 against it; Q4_0 does not; the base's own record is KLD 0 exactly."""
    names = [
        str(tiny_model),
        str(candidates["F32"]),
        str(candidates["onnx"]),
        str(candidates["Q4_0"]),
    ]
    stages: list[str] = []
    recs = [
        r
        for r, _ in compare(_req(tiny_text, names, backend="auto", use_cache=False), stages.append)
    ]
    assert [r["name"] for r in recs] == names
    assert [r["backend"] for r in recs] == ["torch", "llama.cpp", "onnxruntime", "llama.cpp"]
    assert [r["format"] for r in recs] == ["safetensors", "gguf", "onnx", "gguf"]
    base, f32, onnx, q4 = recs
    assert base["kld"]["mean"] == 0.0 and base["kld"]["top1_agreement"] == 1.0
    assert base["perplexity"] == pytest.approx(base["base_perplexity"])
    for r in (f32, onnx):
        assert r["kld"]["mean"] < 1e-4 and r["kld"]["top1_agreement"] > 0.98
        assert r["perplexity"] == pytest.approx(base["perplexity"], rel=1e-3)
    assert q4["kld"]["mean"] > 10 * max(f32["kld"]["mean"], 1e-6)
    # sizes and labels come from the files and their provenance
    assert f32["bits_per_weight"] == pytest.approx(32.0) and 4 < q4["bits_per_weight"] < 6
    assert q4["bytes"] == candidates["Q4_0"].stat().st_size
    assert q4["provenance"]["label"] == "export gguf Q4_0" and base["provenance"]["label"] == "base"
    assert all(r["schema"] == "cllm.eval/1" for r in recs)
    # one base pass for four candidates, even with the disk cache off
    assert sum("loading the base" in s for s in stages) == 1


def test_show_worst_lists_the_largest_kld_positions(
    tiny_model: Path, tiny_text: Path, candidates: dict[str, Path]
) -> None:
    req = _req(tiny_text, [str(candidates["Q4_0"])], kld_base=str(tiny_model), show_worst=4)
    ((rec, _),) = list(compare(req))
    worst = rec["worst"]
    assert [w["rank"] for w in worst] == [1, 2, 3, 4]
    klds = [w["kld"] for w in worst]
    assert klds == sorted(klds, reverse=True)
    assert klds[0] == pytest.approx(rec["kld"]["max"], rel=1e-6)
    for w in worst:
        assert CTX // 2 < w["position"] < CTX and len(w["base_top"]) == 3
        ps = [t["p"] for t in w["model_top"]]
        assert ps == sorted(ps, reverse=True) and 0 < sum(ps) <= 1.0001
        assert isinstance(w["next"], str) and w["context"]


def test_a_candidate_with_another_vocabulary_is_refused_before_any_work(
    tiny_model: Path, tiny_text: Path, tmp_path: Path
) -> None:
    other = save_tiny_llama(tmp_path / "bigger-vocab", vocab_size=640)
    stages: list[str] = []
    with pytest.raises(InputError, match="vocabulary of 640 tokens"):
        list(
            compare(_req(tiny_text, [str(tiny_model), str(tiny_model), str(other)]), stages.append)
        )
    assert not any("loading" in s for s in stages)


def test_show_worst_without_a_base_is_a_usage_error(tiny_model: Path, tiny_text: Path) -> None:
    with pytest.raises(UsageError, match="--show-worst needs a base"):
        list(compare(_req(tiny_text, [str(tiny_model)], show_worst=3)))


def test_cli_several_models_give_one_ndjson_record_each(
    tiny_model: Path, tiny_text: Path, candidates: dict[str, Path]
) -> None:
    p = cli_in_process("eval", str(tiny_model), str(candidates["Q4_0"]), "--text", str(tiny_text),
                       "--ctx", str(CTX), "--chunks", "2", "--json", "--max-kld", "10")  # fmt: skip
    assert p.returncode == 0, p.stderr
    recs = [json.loads(line) for line in p.stdout.splitlines()]
    assert len(recs) == 2 and recs[1]["kld"]["base_sha256"] == recs[0]["sha256"]
    bar = cli_in_process("eval", str(tiny_model), str(candidates["Q4_0"]), "--text", str(tiny_text),
                         "--ctx", str(CTX), "--chunks", "2", "--max-kld", "1e-9")  # fmt: skip
    assert bar.returncode == 3 and "tiny.Q4_0.gguf: mean KLD" in bar.stderr
    assert bar.stderr.count("mean KLD") == 1  # the base itself (KLD 0) passes
    assert any("tiny.Q4_0.gguf" in line for line in bar.stdout.splitlines())  # the table
