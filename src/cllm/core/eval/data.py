"""The evaluation text, tokenized once per (text, tokenizer) and cached."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cllm.errors import InputError
from cllm.formats.hashing import file_sha256
from cllm.paths import cache_dir


@dataclass(frozen=True)
class EvalTokens:
    ids: np.ndarray  # int64
    text_path: Path
    text_sha256: str
    tokenizer_sha256: str


def tokenizer_sha256(tokenizer_dir: Path) -> str:
    target = tokenizer_dir / "tokenizer.json"
    if not target.exists():
        target = tokenizer_dir / "tokenizer_config.json"
    return file_sha256(target)


def read_text_file(path: Path, what: str = "evaluation text") -> str:
    """A UTF-8 text file, or one line saying why it is not one.

    Invalid bytes are an error, not replaced: a binary file or a text in another encoding
    would otherwise be tokenized into plausible-looking garbage, and calibrating or
    measuring on that gives a silently wrong model or number. A NUL character is taken as
    the mark of a binary file (it decodes as UTF-8, but no text holds one).
    """
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{what} {path} is not UTF-8 text (invalid byte 0x{raw[exc.start]:02x} at offset {exc.start})",
            "Pass a plain-text file; convert other encodings first, e.g. iconv -t UTF-8",
        ) from None
    if "\x00" in text:
        raise InputError(
            f"{what} {path} holds NUL bytes (offset {text.index(chr(0))}): it looks binary, not text",
            "Pass a plain-text file",
        )
    if not text.strip():
        raise InputError(f"{what} {path} is empty", "Pass a file with text in it")
    return text


def load_tokens(text_path: Path, tokenizer_dir: Path, what: str = "evaluation text") -> EvalTokens:
    """Tokenize the whole text as one string, no special tokens added (the pinned protocol)."""
    text_path = Path(text_path)
    if not text_path.is_file():
        raise InputError(
            f"{what} not found: {text_path}",
            "Pass --text FILE or set CLLM_DATA_DIR to the folder holding wikitext-2/wiki.test.raw",
        )
    text_sha = file_sha256(text_path)
    tok_sha = tokenizer_sha256(tokenizer_dir)
    cached = cache_dir() / "tokens" / f"{text_sha[:16]}-{tok_sha[:16]}.npy"
    if cached.exists():
        try:
            return EvalTokens(np.load(cached).astype(np.int64), text_path, text_sha, tok_sha)
        except (OSError, ValueError):
            pass
    text = read_text_file(text_path, what)
    from cllm.formats.checkpoint import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int32)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, ids)
    os.replace(tmp, cached)
    return EvalTokens(ids.astype(np.int64), text_path, text_sha, tok_sha)


def make_chunks(tokens: np.ndarray, ctx: int, chunks: int | None) -> list[np.ndarray]:
    """Non-overlapping windows of `ctx` tokens from the start; a short tail is dropped."""
    if ctx < 16 or ctx % 2:
        raise InputError(f"--ctx {ctx} is invalid", "Use an even context of at least 16 tokens")
    available = len(tokens) // ctx
    if available == 0:
        raise InputError(
            f"the text has {len(tokens)} tokens, fewer than one chunk of {ctx}",
            "Pass a longer --text file or a smaller --ctx",
        )
    n = available if chunks is None else chunks
    if n < 1:
        raise InputError(f"--chunks {chunks} is invalid", "Give at least 1")
    if n > available:
        raise InputError(
            f"--chunks {n} asks for more than the {available} chunks of {ctx} tokens the text holds"
        )
    return [tokens[i * ctx : (i + 1) * ctx] for i in range(n)]
