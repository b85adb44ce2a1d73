"""Tiny real models for tests and plugin authors: built in-process, no download.

A 2-layer Llama (hidden 64) with a byte-level BPE tokenizer of 264 tokens, saved
as a real HF folder, so every reader, writer and backend runs on it unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 264,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 256,
    "eos_token_id": 256,
}
_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n")]


def tiny_tokenizer() -> Any:
    """A GPT-2 style byte-level BPE: 256 byte tokens, one special token, 7 merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(byte_chars))}
    special = "<|endoftext|>"
    vocab[special] = 256
    for a, b in _MERGES:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(_MERGES)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([special])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=special,
        eos_token=special,
        unk_token=special,
        pad_token=special,
    )


def tiny_llama(seed: int = 0, **overrides: Any) -> Any:
    """A randomly initialised LlamaForCausalLM (fp32, eval mode)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**TINY_CONFIG, **overrides})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    # larger-than-default weights so logits are not nearly uniform and quantization visibly matters
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    return model.eval()


def save_tiny_llama(folder: Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny model as an HF folder (config.json, model.safetensors, tokenizer)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = tiny_llama(seed, **overrides)
    model.save_pretrained(str(folder), safe_serialization=True)
    tiny_tokenizer().save_pretrained(str(folder))
    return folder


def tiny_text(n_words: int = 3000, seed: int = 0) -> str:
    """Deterministic English-like text for perplexity tests on tiny models."""
    import random

    words = [
        "the",
        "cat",
        "sat",
        "on",
        "a",
        "mat",
        "and",
        "then",
        "ran",
        "in",
        "garden",
        "under",
        "tree",
        "with",
        "her",
    ]
    rng = random.Random(seed)
    lines = []
    for _ in range(n_words // 12):
        lines.append(" ".join(rng.choice(words) for _ in range(12)) + " .")
    return "\n".join(lines) + "\n"
