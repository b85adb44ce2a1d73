"""The GGUF writer's shortcuts (bulk metadata arrays, cached tokenizer keys) change no byte."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from gguf import GGUFValueType, GGUFWriter

from cllm.formats.gguf_io import _build_tokenizer_fields, _fast_writer_class, _tokenizer_fields


@pytest.mark.parametrize(
    ("value", "sub_type"),
    [
        ([f"tok{i}" for i in range(300)] + ["Ġé", "你好", "", "\u00ff"], None),
        (list(range(-50, 250)), GGUFValueType.INT32),
        ([i * 0.5 for i in range(100)], None),
        ([1, 2, 3], GGUFValueType.INT32),  # short: the generic path
        ([True] * 100, None),  # bools are not packed in bulk
    ],
)
def test_fast_array_packing_matches_gguf_py(value: list, sub_type: GGUFValueType | None) -> None:
    plain = GGUFWriter(None, "llama")
    fast = _fast_writer_class(GGUFWriter)(None, "llama")
    for add_vtype in (True, False):
        want = plain._pack_val(value, GGUFValueType.ARRAY, add_vtype, sub_type)
        assert fast._pack_val(value, GGUFValueType.ARRAY, add_vtype, sub_type) == want


def test_tokenizer_fields_cached_by_content(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLLM_CACHE", str(tmp_path / "cache"))  # the test poisons its cache
    carried = {"tokenizer.ggml.pre": "smollm"}
    built = _build_tokenizer_fields(tiny_model, 264, carried)
    first = _tokenizer_fields(tiny_model, 264, carried)
    assert first == json.loads(json.dumps(built))
    files = sorted((tmp_path / "cache" / "gguf-tokenizers").glob("*.json"))
    assert files, "the fields were not cached"
    # a warm call reads the cache: poison it and see the poisoned value come back
    for f in files:
        data = json.loads(f.read_text())
        data["tokenizer.ggml.pre"] = "from-cache"
        f.write_text(json.dumps(data))
    assert _tokenizer_fields(tiny_model, 264, carried)["tokenizer.ggml.pre"] == "from-cache"
    # other carried keys, vocabulary size or tokenizer files are other entries
    assert (
        _tokenizer_fields(tiny_model, 264, {"tokenizer.ggml.pre": "x"})["tokenizer.ggml.pre"] == "x"
    )
    assert len(_tokenizer_fields(tiny_model, 300, carried)["tokenizer.ggml.tokens"]) == 300
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ messages }}"
    (other / "tokenizer_config.json").write_text(json.dumps(cfg))
    fields = _tokenizer_fields(other, 264, carried)
    assert fields["tokenizer.ggml.pre"] == "smollm"
    assert fields["tokenizer.chat_template"] == "{{ messages }}"
