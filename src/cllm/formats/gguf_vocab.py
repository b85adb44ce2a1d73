"""GGUF tokenizer keys from an HF tokenizer (the reverse is transformers' own GGUF loader).

Two kinds, as llama.cpp has them:
- byte-level BPE (`tokenizer.ggml.model = gpt2`): tokens and merges as they are, plus
  `tokenizer.ggml.pre`, the name of the pre-tokenizer llama.cpp re-implements. It is found
  as llama.cpp's converter finds it, by hashing the tokenizer's ids on a fixed test text;
  a tokenizer whose vocabulary no reference model shares (a custom or tiny one) is
  recognised by its pre-tokenizer's configuration instead, and one that is neither is
  refused: llama.cpp would split its text differently, so every prompt would differ.
- SentencePiece (`tokenizer.ggml.model = llama`; Llama 2, Mistral, Gemma, Phi-3): tokens
  with scores and types, byte-fallback pieces as BYTE tokens. llama.cpp merges the pair
  whose joined piece has the highest score, so a BPE piece's score is minus the rank of
  the merge that makes it, which reproduces the tokenizer's merge order exactly.
"""

from __future__ import annotations

import json
from hashlib import sha256
from typing import Any

from cllm.errors import UsageError

# llama.cpp's converter test text (convert_hf_to_gguf_update.py, CHK_TXT), character for
# character: the hashes below are of str(tokenizer.encode(CHK_TXT)).
CHK_TXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n"
    "\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f (multiple emojis concatenated) "
    "\u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785"
    "\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? "
    "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# chkhsh -> tokenizer.ggml.pre, for the reference tokenizers of the families cllm supports
PRE_BY_HASH = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
}

# The split patterns of the Llama 3 and Qwen2 tokenizer.json files (they differ in how
# many digits one piece may hold).
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
LLAMA3_SPLIT = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_PRE = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}

# token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def chk_hash(tok: Any) -> str:
    return sha256(str(tok.encode(CHK_TXT)).encode()).hexdigest()


def _pre_by_structure(pre: Any) -> str | None:
    """The llama.cpp pre-tokenizer that splits text exactly as this tokenizer.json does."""
    if not isinstance(pre, dict):
        return None
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    if not isinstance(steps, list):
        return None
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm" if steps[1].get("use_regex", True) else None
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = steps[0].get("pattern", {}).get("Regex")
        if steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
            return _SPLIT_PRE.get(pattern)
    return None


def bpe_pre_name(tok: Any, tokenizer_json: dict[str, Any]) -> str:
    h = chk_hash(tok)
    name = PRE_BY_HASH.get(h) or _pre_by_structure(tokenizer_json.get("pre_tokenizer"))
    if name is None:
        raise UsageError(
            f"the tokenizer's BPE pre-tokenizer is not one llama.cpp implements (test hash {h[:16]})",
            "Supported: " + ", ".join(sorted(set(PRE_BY_HASH.values()) | {"gpt-2"})),
        )
    return name


def is_sentencepiece(tokenizer_json: dict[str, Any]) -> bool:
    """A SentencePiece-style tokenizer.json: BPE over '▁'-joined text with byte fallback."""
    model = tokenizer_json.get("model", {})
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def add_space_prefix(tokenizer_json: dict[str, Any]) -> bool:
    """Whether the tokenizer puts '▁' before the first word (SentencePiece's dummy prefix)."""
    text = json.dumps([tokenizer_json.get("normalizer"), tokenizer_json.get("pre_tokenizer")])
    if '"Prepend"' in text:
        return True
    return (
        '"Metaspace"' in text
        and '"prepend_scheme": "never"' not in text
        and ('"add_prefix_space": true' in text or '"prepend_scheme"' in text)
    )


def _merge_pairs(model: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for m in model.get("merges", []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        out.append((a, b))
    return out


def vocab_fields(tok: Any, tokenizer_json: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """tokens, types (and merges or scores) for either kind; specials added by the caller."""
    backend = tok.backend_tokenizer
    vocab = backend.get_vocab(with_added_tokens=True)
    n = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [UNUSED] * n
    for text, idx in vocab.items():
        tokens[idx] = text
        types[idx] = NORMAL
    model = tokenizer_json.get("model", {})
    if is_sentencepiece(tokenizer_json):
        scores = [-1e4] * n
        base = model.get("vocab", {})
        for text, idx in base.items():
            scores[idx] = 0.0
            if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                types[idx] = BYTE
        for rank, (a, b) in enumerate(_merge_pairs(model)):
            idx = base.get(a + b)
            if idx is not None:
                scores[idx] = -float(rank + 1)
        unk = model.get("unk_token")
        if unk in vocab:
            types[vocab[unk]] = UNKNOWN
        fields = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
                  "tokenizer.ggml.scores": scores,
                  "tokenizer.ggml.add_space_prefix": add_space_prefix(tokenizer_json)}  # fmt: skip
    else:
        fields = {"tokenizer.ggml.model": "gpt2",
                  "tokenizer.ggml.merges": [f"{a} {b}" for a, b in _merge_pairs(model)]}  # fmt: skip
    for idx, added in tok.added_tokens_decoder.items():
        if idx < n:
            types[idx] = CONTROL if added.special else USER_DEFINED
    fields["tokenizer.ggml.tokens"] = tokens
    fields["tokenizer.ggml.token_type"] = types
    return fields


def spm_tokenizer(
    tokens: list[str],
    scores: list[float],
    types: list[int],
    space_prefix: bool,
    specials: dict[str, int | None],
) -> Any:
    """An HF fast tokenizer that splits text as llama.cpp's SentencePiece tokenizer does.

    transformers' own GGUF conversion puts the '▁' prefix in a Metaspace pre-tokenizer,
    which drops one of several leading spaces and adds no prefix after a special token,
    unlike the SentencePiece tokenizers these files come from; this one prefixes in the
    normalizer, as those tokenizers' tokenizer.json files do. Merges are every split of a
    piece into two pieces, ranked by the piece's score (llama.cpp's merge order).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(tokens) if types[i] in (NORMAL, BYTE, UNKNOWN, CONTROL)}
    ranked = []
    for piece, idx in vocab.items():
        if types[idx] != NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            a, b = piece[:cut], piece[cut:]
            if a in vocab and b in vocab:
                ranked.append((-scores[idx], idx, vocab[a], a, b))
    ranked.sort()
    merges = [(a, b) for _s, _i, _l, a, b in ranked]
    unk = next((t for i, t in enumerate(tokens) if types[i] == UNKNOWN), None)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token=unk,
                               fuse_unk=True))  # fmt: skip
    mark = "\u2581"
    norm = [normalizers.Replace(" ", mark)]
    tok.normalizer = normalizers.Sequence(
        ([normalizers.Prepend(mark)] if space_prefix else []) + norm
    )
    steps = [decoders.Replace(mark, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if space_prefix else []))
    tok.add_special_tokens([t for i, t in enumerate(tokens) if types[i] == CONTROL])
    user = [t for i, t in enumerate(tokens) if types[i] == USER_DEFINED]
    if user:
        tok.add_tokens(user)
    names = {k: tokens[v] for k, v in specials.items() if v is not None and 0 <= v < len(tokens)}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **names)
