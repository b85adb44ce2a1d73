"""Round trips between safetensors (folder, single file) and GGUF on a tiny real Llama."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cllm.formats.checkpoint import open_checkpoint
from cllm.formats.gguf_io import WRITABLE_TYPES, GGUFCheckpoint
from cllm.formats.provenance import make_provenance
from cllm.formats.save import plan_tensors, save_gguf, save_hf_folder, save_single_file

QUANT_TYPES = [t for t in WRITABLE_TYPES if t.startswith("Q")]


def _prov(op: str = "test") -> dict:
    return make_provenance(op, {"k": 1}, "0" * 64, None, "src")


@pytest.fixture(scope="module")
def gguf_files(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    ckpt = open_checkpoint(tiny_model)
    out = tmp_path_factory.mktemp("gguf")
    files = {}
    for t in WRITABLE_TYPES:
        files[t] = out / f"tiny.{t}.gguf"
        save_gguf(files[t], ckpt, t, _prov())
    return files


def test_single_file_roundtrip_is_exact(tiny_model: Path, tmp_path: Path) -> None:
    src = open_checkpoint(tiny_model)
    out = tmp_path / "one.safetensors"
    save_single_file(out, src.config, plan_tensors(src), src.tokenizer_dir(), _prov("x"), {})
    back = open_checkpoint(out)
    assert back.format == "safetensors"
    assert set(back.tensor_infos()) == set(src.tensor_infos())
    for name in src.tensor_infos():
        assert torch.equal(back.get(name), src.get(name)), name
    assert back.config == src.config
    assert back.provenance is not None and back.provenance["op"] == "x"
    text = "the cat sat on the mat"
    assert back.tokenizer()(text)["input_ids"] == src.tokenizer()(text)["input_ids"]


def test_hf_folder_roundtrip_loads_in_transformers(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    src = open_checkpoint(tiny_model)
    out = tmp_path / "folder"
    save_hf_folder(out, src.config, plan_tensors(src, "BF16"), src.tokenizer_dir(), _prov(), {})
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model)
    for (n1, p1), (n2, p2) in zip(
        model.state_dict().items(), ref.state_dict().items(), strict=True
    ):
        assert n1 == n2
        assert torch.equal(p1, p2.to(torch.bfloat16)), n1


def test_gguf_f32_roundtrip_is_exact(tiny_model: Path, gguf_files: dict[str, Path]) -> None:
    src = open_checkpoint(tiny_model)
    back = open_checkpoint(gguf_files["F32"])
    assert isinstance(back, GGUFCheckpoint)
    assert set(back.tensor_infos()) == set(src.tensor_infos())
    for name in src.tensor_infos():
        # q/k rows are permuted for llama.cpp's rope layout on the way in and back on the way out
        assert torch.equal(back.get(name), src.get(name)), name
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "intermediate_size",
    ):
        assert back.config[key] == src.config[key], key
    assert back.config["tie_word_embeddings"] is False


def _block_bound(w: np.ndarray, qtype: str) -> np.ndarray:
    """Largest rounding error each element may have: half a quantization step of its block."""
    blocks = w.reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    span = blocks.max(axis=1, keepdims=True) - blocks.min(axis=1, keepdims=True)
    step = {
        "Q8_0": amax / 127,
        "Q4_0": amax / 8,
        "Q5_0": amax / 16,
        "Q4_1": span / 15,
        "Q5_1": span / 31,
    }[qtype]
    # symmetric Q4_0/Q5_0 map the block's signed extreme to -8/-16, so the opposite extreme can
    # clip by up to one full step; the others round to the nearest step. Scales are float16.
    half = 1.0 if qtype in ("Q4_0", "Q5_0") else 0.5
    bound = step * half * 1.01 + amax * 2e-3 + 1e-7
    return np.broadcast_to(bound, blocks.shape).reshape(w.shape)


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_gguf_quantized_within_block_error_bound(
    tiny_model: Path, gguf_files: dict[str, Path], qtype: str
) -> None:
    src = open_checkpoint(tiny_model)
    back = open_checkpoint(gguf_files[qtype])
    infos = back.tensor_infos()
    quantized = [n for n, i in infos.items() if i.dtype == qtype]
    assert len(quantized) == 2 * 7 + 2  # every 2-D tensor: 7 per layer, embeddings, lm_head
    for name in infos:
        w = src.get(name).numpy()
        got = back.get(name).numpy()
        if infos[name].dtype == "F32":
            assert np.array_equal(got, w), name
            continue
        err = np.abs(got - w)
        assert (err <= _block_bound(w, qtype)).all(), f"{name}: max err {err.max()}"
        assert err.max() > 0, f"{name} was not quantized at all"


@pytest.mark.parametrize("ftype,rel", [("F16", 2**-11), ("BF16", 2**-8)])
def test_gguf_float_types_within_rounding(
    tiny_model: Path, gguf_files: dict[str, Path], ftype: str, rel: float
) -> None:
    src = open_checkpoint(tiny_model)
    back = open_checkpoint(gguf_files[ftype])
    for name, info in back.tensor_infos().items():
        w = src.get(name).numpy()
        got = back.get(name).numpy()
        assert info.dtype in (ftype, "F32")
        assert np.all(np.abs(got - w) <= np.abs(w) * rel + 6e-8), name  # 6e-8: float16 subnormals


def test_gguf_bytes_match_gguf_quants(tiny_model: Path, gguf_files: dict[str, Path]) -> None:
    """Golden check: the stored blocks are exactly gguf-py's quantization of the llama.cpp row order."""
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import quantize

    from cllm.formats.arch.families import LLAMA

    src = open_checkpoint(tiny_model)
    reader = GGUFReader(gguf_files["Q4_0"])
    by_name = {t.name: t for t in reader.tensors}
    name = "model.layers.1.self_attn.q_proj.weight"
    w = LLAMA.to_gguf(name, src.get(name).numpy(), src.config)
    want = quantize(w, GGMLQuantizationType.Q4_0)
    got = np.asarray(by_name["blk.1.attn_q.weight"].data)
    assert np.array_equal(got.reshape(want.shape), want)


def test_gguf_to_safetensors_to_gguf_keeps_tokenizer(
    gguf_files: dict[str, Path], tmp_path: Path
) -> None:
    from gguf import GGUFReader

    first = open_checkpoint(gguf_files["F32"])
    mid = tmp_path / "mid.safetensors"
    save_single_file(
        mid, first.config, plan_tensors(first), first.tokenizer_dir(), _prov(), first.gguf_kv
    )
    again = tmp_path / "again.gguf"
    save_gguf(again, open_checkpoint(mid), "F32", _prov())
    a, b = GGUFReader(gguf_files["F32"]), GGUFReader(again)
    for key in (
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
    ):
        assert a.fields[key].contents() == b.fields[key].contents(), key
    for ta, tb in zip(a.tensors, b.tensors, strict=True):
        assert ta.name == tb.name
        assert np.array_equal(np.asarray(ta.data), np.asarray(tb.data)), ta.name


def test_row_length_not_multiple_of_block_falls_back(tmp_path: Path) -> None:
    from cllm.testing.tiny import save_tiny_llama

    folder = save_tiny_llama(
        tmp_path / "odd",
        hidden_size=48,
        intermediate_size=80,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    out = tmp_path / "odd.gguf"
    counts = save_gguf(out, open_checkpoint(folder), "Q4_0", _prov())
    assert counts.get("F16", 0) > 0  # rows of 48 or 80 cannot hold 32-blocks: written as F16
    back = open_checkpoint(out)
    assert {i.dtype for i in back.tensor_infos().values()} <= {"F16", "F32", "Q4_0"}


def test_llama_cpp_loads_every_written_type(
    tiny_model: Path, gguf_files: dict[str, Path], tiny_text: Path
) -> None:
    from cllm.core.eval.backends import LlamaCppBackend, TorchBackend

    ids = np.arange(10, 74) % 256
    ref = TorchBackend(open_checkpoint(tiny_model)).logits(ids)
    errors = {}
    for qtype, path in gguf_files.items():
        backend = LlamaCppBackend(path, ctx=64, threads=2)
        try:
            got = backend.logits(ids)
        finally:
            backend.close()
        assert got.shape == ref.shape
        assert np.isfinite(got).all()
        errors[qtype] = float(np.abs(got - ref).max())
    assert errors["F32"] < 1e-3 * max(1.0, float(np.abs(ref).max()))
    assert errors["Q8_0"] < errors["Q4_0"]
    assert errors["Q5_0"] < errors["Q4_0"]


@pytest.mark.parametrize("how", ["depth", "width"])
def test_pruned_shapes_export_to_gguf_that_llama_cpp_runs(tmp_path: Path, how: str) -> None:
    """A model with a layer dropped (depth) or a narrower MLP in every layer (width, as
    structured pruning leaves it): the GGUF follows the config and llama.cpp matches torch."""
    from cllm.core.eval.backends import LlamaCppBackend, TorchBackend
    from cllm.testing.tiny import save_tiny_llama

    if how == "depth":
        src = save_tiny_llama(tmp_path / "three", num_hidden_layers=3)
        ckpt = open_checkpoint(src)
        keep = {0: 0, 2: 1}  # drop the middle layer, renumber the last
        tensors = {}
        for name in ckpt.tensor_infos():
            parts = name.split(".")
            if name.startswith("model.layers."):
                old = int(parts[2])
                if old not in keep:
                    continue
                parts[2] = str(keep[old])
            tensors[".".join(parts)] = ckpt.get(name)
        pruned = tmp_path / "pruned"
        pruned.mkdir()
        from safetensors.torch import save_file

        save_file(tensors, str(pruned / "model.safetensors"))
        cfg = dict(ckpt.config, num_hidden_layers=2)
        (pruned / "config.json").write_text(json.dumps(cfg))
        for f in src.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                (pruned / f.name).write_bytes(f.read_bytes())
    else:
        pruned = save_tiny_llama(tmp_path / "narrow", intermediate_size=96)
    model = open_checkpoint(pruned)
    out = tmp_path / "p.gguf"
    save_gguf(out, model, "F32", _prov())
    ids = np.arange(10, 50) % 256
    ref = TorchBackend(model).logits(ids)
    backend = LlamaCppBackend(out, ctx=64, threads=2)
    try:
        got = backend.logits(ids)
    finally:
        backend.close()
    assert float(np.abs(got - ref).max()) < 1e-3 * max(1.0, float(np.abs(ref).max()))


def test_source_date_epoch_makes_a_rewrite_byte_identical(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recipes' promise: a deterministic step run twice writes the same bytes. Only the
    provenance timestamp differs between runs, and SOURCE_DATE_EPOCH fixes it."""
    ckpt = open_checkpoint(tiny_model)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")
    digests = []
    for i in range(2):
        out = tmp_path / f"m{i}.gguf"
        prov = make_provenance("export", {"to": "gguf"}, ckpt.sha256, None, command=["cllm"])
        assert prov["created"] == "2026-01-01T00:00:00Z"
        save_gguf(out, ckpt, "Q8_0", prov)
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    assert make_provenance("x", {}, None, None)["created"] != "2026-01-01T00:00:00Z"
