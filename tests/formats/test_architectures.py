"""Every supported family, HF <-> GGUF: llama.cpp runs what cllm writes as transformers
runs the source, a GGUF reads back into the same model, and the spec's tensor table is
the one transformers' own model class has."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cllm.formats.checkpoint import open_checkpoint
from cllm.formats.provenance import make_provenance
from cllm.formats.save import save_gguf
from cllm.testing.tiny import FAMILIES, save_tiny_family, tiny_family_config

FAMILY_NAMES = list(FAMILIES)


def _prov() -> dict:
    return make_provenance("test", {}, None, None)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {f: save_tiny_family(root / f, f, seed=1) for f in FAMILY_NAMES}


@pytest.fixture(scope="module")
def f32_ggufs(family_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("family-gguf")
    out = {}
    for fam, folder in family_dirs.items():
        out[fam] = root / f"{fam}.F32.gguf"
        save_gguf(out[fam], open_checkpoint(folder), "F32", _prov())
    return out


def _ids(n: int = 40) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, n)


def _torch_logits(folder_or_ckpt: Path, ids: np.ndarray) -> np.ndarray:
    from cllm.core.eval.backends import build_torch_model

    model = build_torch_model(open_checkpoint(folder_or_ckpt))
    with torch.inference_mode():
        return model(torch.as_tensor(ids)[None], use_cache=False).logits[0].numpy()


def _llamacpp_logits(gguf: Path, ids: np.ndarray) -> np.ndarray:
    from cllm.standalone.guard import load_llama

    # F32 KV cache: llama.cpp's default F16 cache alone costs ~3e-4 relative error
    llm = load_llama(str(gguf), n_ctx=64, n_batch=64, n_ubatch=64, logits_all=True,
                     verbose=False, type_k=0, type_v=0, n_threads=2)  # fmt: skip
    try:
        llm.eval([int(t) for t in ids])
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_spec_tensors_are_transformers_tensors(family: str) -> None:
    """The spec's per-layer table (names and shapes) is exactly the model class's."""
    from transformers import AutoModelForCausalLM

    from cllm.formats.arch import spec_for_config

    cfg = tiny_family_config(family)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    have = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    want = spec_for_config(cfg.to_dict()).expected_shapes(cfg.to_dict())
    optional = {n for n in want if n.endswith(".bias")}
    assert set(have) <= set(want)
    assert set(want) - set(have) <= optional
    for name, shape in have.items():
        assert want[name] == shape, name


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_llamacpp_runs_the_gguf_as_transformers_runs_the_model(
    family: str, family_dirs: dict[str, Path], f32_ggufs: dict[str, Path]
) -> None:
    ids = _ids()
    ref = _torch_logits(family_dirs[family], ids)
    got = _llamacpp_logits(f32_ggufs[family], ids)
    assert _rel(got, ref) <= 1e-3
    assert np.array_equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_gguf_reads_back_as_the_same_model(
    family: str, family_dirs: dict[str, Path], f32_ggufs: dict[str, Path]
) -> None:
    src = open_checkpoint(family_dirs[family])
    back = open_checkpoint(f32_ggufs[family])
    assert set(back.tensor_infos()) == set(src.tensor_infos()) - (
        {"lm_head.weight"} if src.config.get("tie_word_embeddings") else set()
    )
    for name in back.tensor_infos():
        # Gemma's norms are stored as 1 + w: float32 rounding of the sum, nothing more
        torch.testing.assert_close(back.get(name), src.get(name), rtol=0, atol=2e-7)
    ids = _ids()
    torch_ref = _torch_logits(family_dirs[family], ids)
    assert _rel(_torch_logits(f32_ggufs[family], ids), torch_ref) <= 1e-5


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_q8_0_matches_llamacpp_quantizer(
    family: str, f32_ggufs: dict[str, Path], family_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """cllm's Q8_0 and llama.cpp's own quantizer, from the same F32 file: same blocks
    wherever both chose Q8_0, and both run."""
    import llama_cpp
    from gguf import GGUFReader

    ours = tmp_path / "ours.Q8_0.gguf"
    save_gguf(ours, open_checkpoint(family_dirs[family]), "Q8_0", _prov())
    theirs = tmp_path / "theirs.Q8_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    rc = llama_cpp.llama_model_quantize(
        str(f32_ggufs[family]).encode(), str(theirs).encode(), params
    )
    assert rc == 0
    a = {t.name: t for t in GGUFReader(ours).tensors}
    b = {t.name: t for t in GGUFReader(theirs).tensors}
    assert set(a) == set(b)
    both = [n for n in a if a[n].tensor_type.name == b[n].tensor_type.name == "Q8_0"]
    assert len(both) >= len(a) // 2
    for name in both:
        assert np.array_equal(np.asarray(a[name].data), np.asarray(b[name].data)), name
    ids = _ids(24)
    la, lb = _llamacpp_logits(ours, ids), _llamacpp_logits(theirs, ids)
    assert _rel(la, lb) <= 1e-2


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_hf_gguf_hf_round_trip_keeps_every_tensor(
    family: str, family_dirs: dict[str, Path], f32_ggufs: dict[str, Path], tmp_path: Path
) -> None:
    from cllm.formats.save import plan_tensors, save_single_file

    first = open_checkpoint(f32_ggufs[family])
    mid = tmp_path / "mid.safetensors"
    save_single_file(
        mid, first.config, plan_tensors(first), first.tokenizer_dir(), _prov(), first.gguf_kv
    )
    again = open_checkpoint(mid)
    src = open_checkpoint(family_dirs[family])
    assert again.config["model_type"] in (src.config["model_type"], "llama")
    for name in first.tensor_infos():
        torch.testing.assert_close(again.get(name), src.get(name), rtol=0, atol=2e-7)


TOKENIZER_TEXT = (
    "Hello world! \u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440 \u4f60\u597d "
    "3 33 333 3333 33333   spaces\t\ttabs\n\nnew lines I've \U0001f999 caf\u00e9 "
)
# what llama.cpp must be told for each family's tokenizer
GGML_MODEL = {"llama": ("gpt2", "gpt-2"), "llama3": ("gpt2", "llama-bpe"),
              "mistral": ("llama", "default"), "qwen2": ("gpt2", "qwen2"),
              "qwen3": ("gpt2", "qwen2"), "gemma3": ("llama", "default"),
              "phi3": ("llama", "default")}  # fmt: skip


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tokenizer_ids_agree_in_llamacpp_and_after_reading_back(
    family: str, family_dirs: dict[str, Path], f32_ggufs: dict[str, Path]
) -> None:
    """The source tokenizer, llama.cpp running the GGUF's vocabulary, and the tokenizer
    cllm converts back from the GGUF give the same ids, special tokens included."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from cllm.standalone.guard import load_llama

    src = AutoTokenizer.from_pretrained(family_dirs[family])
    special = src.eos_token
    text = TOKENIZER_TEXT + special + " after"
    want = src.encode(text, add_special_tokens=False)
    assert src.convert_tokens_to_ids(special) in want

    fields = GGUFReader(f32_ggufs[family]).fields
    model, pre = GGML_MODEL[family]
    assert fields["tokenizer.ggml.model"].contents() == model
    assert fields["tokenizer.ggml.pre"].contents() == pre

    llm = load_llama(str(f32_ggufs[family]), vocab_only=True, verbose=False)
    try:
        got = llm.tokenize(text.encode(), add_bos=False, special=True)
    finally:
        llm.close()
    assert got == want

    back = AutoTokenizer.from_pretrained(open_checkpoint(f32_ggufs[family]).tokenizer_dir())
    assert back.encode(text, add_special_tokens=False) == want
    assert back.decode(want) == src.decode(want)


def test_unknown_bpe_pre_tokenizer_is_refused(tmp_path: Path) -> None:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from cllm.errors import UsageError
    from cllm.formats.gguf_vocab import bpe_pre_name

    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate("abc ")}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\d{1,7}"), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    import json

    with pytest.raises(UsageError, match="pre-tokenizer is not one llama.cpp implements"):
        bpe_pre_name(fast, json.loads(tok.to_str()))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_chat_template_and_special_tokens_are_carried(
    family: str, family_dirs: dict[str, Path], f32_ggufs: dict[str, Path]
) -> None:
    """The chat template reaches the GGUF (where llama.cpp's chat code reads it) and comes
    back; a rendered conversation tokenizes to the same ids, BOS/EOS ids included."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    src = AutoTokenizer.from_pretrained(family_dirs[family])
    assert src.chat_template
    fields = GGUFReader(f32_ggufs[family]).fields
    assert fields["tokenizer.chat_template"].contents() == src.chat_template
    assert fields["tokenizer.ggml.bos_token_id"].contents() == src.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"].contents() == src.eos_token_id
    back = AutoTokenizer.from_pretrained(open_checkpoint(f32_ggufs[family]).tokenizer_dir())
    chat = [
        {"role": "user", "content": "the cat sat"},
        {"role": "assistant", "content": "on a mat"},
    ]
    want = src.apply_chat_template(chat, tokenize=True)
    assert back.apply_chat_template(chat, tokenize=True) == want
    assert (back.bos_token_id, back.eos_token_id) == (src.bos_token_id, src.eos_token_id)


def test_read_back_tokenizers_differ_when_only_the_template_differs(
    family_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """The converted-tokenizer cache is keyed by every tokenizer field, not the vocabulary
    alone: a GGUF without a chat template must not get one cached from another GGUF."""
    import shutil

    from transformers import AutoTokenizer

    plain = tmp_path / "plain"
    shutil.copytree(family_dirs["llama"], plain)
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    a, b = tmp_path / "with.gguf", tmp_path / "without.gguf"
    save_gguf(a, open_checkpoint(family_dirs["llama"]), "F32", _prov())
    save_gguf(b, open_checkpoint(plain), "F32", _prov())
    ta = AutoTokenizer.from_pretrained(open_checkpoint(a).tokenizer_dir())
    tb = AutoTokenizer.from_pretrained(open_checkpoint(b).tokenizer_dir())
    assert ta.chat_template and not tb.chat_template
