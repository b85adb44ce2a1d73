"""Tiny real models for tests and plugin authors: built in-process, no download.

A 2-layer Llama (hidden 64) with a byte-level BPE tokenizer of 264 tokens, saved
as a real HF folder, so every reader, writer and backend runs on it unchanged; and
one tiny model per supported family (`FAMILIES`), each using the features that make
its family differ from Llama (biases, QK-norm, Gemma's sandwich norms and sliding
window, Phi-3's fused projections and partial rotary, Llama 3's RoPE scaling).
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


_BASE: dict[str, Any] = {
    **{k: v for k, v in TINY_CONFIG.items() if k != "rope_theta"},
    "pad_token_id": 256,
}

_SPM_IDS = {"vocab_size": 544, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
# the tokenizer each family's tiny model gets: the kind its real models ship
TOKENIZER_KIND = {"llama": "gpt2", "llama3": "llama3", "mistral": "spm", "qwen2": "qwen2",
                  "qwen3": "qwen2", "gemma3": "spm-no-prefix", "phi3": "spm"}  # fmt: skip

# family -> (transformers model_type, config overrides). Sizes stay tiny; each config sets
# what llama.cpp must reproduce for that family.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {"rope_theta": 10000.0}),
    "llama3": ("llama", {"vocab_size": 384,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192},
        "max_position_embeddings": 131072,
    }),
    "mistral": ("mistral", {"sliding_window": None, "rope_theta": 1000000.0, **_SPM_IDS}),
    "qwen2": ("qwen2", {"tie_word_embeddings": True, "rope_theta": 1000000.0, "vocab_size": 384}),
    "qwen3": ("qwen3", {"head_dim": 32, "rope_theta": 1000000.0, "vocab_size": 384}),
    # llama.cpp fixes Gemma 3's pattern (one global layer in six), local base and query
    # scale, so the tiny model has six layers and query_pre_attn_scalar == head_dim
    "gemma3": ("gemma3_text", {
        "num_hidden_layers": 6, "head_dim": 16, "query_pre_attn_scalar": 16,
        "sliding_window": 8, "final_logit_softcapping": 30.0, "tie_word_embeddings": True,
        "rms_norm_eps": 1e-6, **_SPM_IDS,
    }),
    # two heads of 32 with half of each rotated: onnxruntime's attention wants the rotary
    # half-width to be a multiple of 8 (Phi-4-mini: 128 * 0.75 / 2 = 48)
    "phi3": ("phi3", {
        "num_attention_heads": 2, "num_key_value_heads": 1,
        "original_max_position_embeddings": 1024, "sliding_window": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                            "partial_rotary_factor": 0.5},
        **_SPM_IDS,
    }),
}  # fmt: skip


def tiny_family_config(family: str, **overrides: Any) -> Any:
    from transformers import AutoConfig

    model_type, extra = FAMILIES[family]
    return AutoConfig.for_model(model_type, **{**_BASE, **extra, **overrides})


def tiny_family_model(family: str, seed: int = 0, **overrides: Any) -> Any:
    """A randomly initialised model of one family (fp32, eval mode). Norm weights and
    biases are random too, so a wrong norm offset or a dropped bias shows in the logits."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = tiny_family_config(family, **overrides)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    offset = 0.0 if cfg.model_type == "gemma3_text" else 1.0  # Gemma's norms compute (1 + w)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
            elif name.endswith("norm.weight"):
                p.normal_(offset, 0.1)
            else:
                p.normal_(0.0, 0.05)
    return model.eval()


def save_tiny_family(folder: Path, family: str, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny model of one family as an HF folder (config.json, model.safetensors,
    tokenizer)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = tiny_family_model(family, seed, **overrides)
    model.save_pretrained(str(folder), safe_serialization=True)
    tok = family_tokenizer(TOKENIZER_KIND[family])
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(folder))
    return folder


# a small chat template of the usual shape (role markers, BOS/EOS around turns), so that
# carrying templates through GGUF is tested per family
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<assistant>\n{% endif %}"
)


# a little of everything a tokenizer has to get right: scripts, digit runs, whitespace
# runs, tabs and newlines, contractions, emoji
_CORPUS = [
    "the cat sat on a mat and then ran in the garden under the tree with her",
    "\u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440, \u043a\u0430\u043a \u0434\u0435\u043b\u0430?",
    "\u4f60\u597d\u4e16\u754c \u6211\u60f3\u5728apple\u5de5\u4f5c 1314151\u5929",
    "3 33 333 3333 33333 2024-12-01 3.14159 1000000",
    "    indented code\n\tif x:\n\t\treturn y  # comment",
    "I've been told he's there, 'RE you sure? We'll see.",
    "emoji \U0001f680 \U0001f999\U0001f999 \u2705 done!!! ??? ...",
] * 20


def family_tokenizer(kind: str) -> Any:
    """A small tokenizer of one kind, trained in-process on `_CORPUS`:
    - "gpt2": `tiny_tokenizer()` (GPT-2 pre-tokenizer);
    - "llama3" / "qwen2": byte-level BPE behind the Llama 3 / Qwen2 split pattern;
    - "spm" / "spm-no-prefix": SentencePiece-style BPE with byte fallback, laid out as
      SentencePiece does (<unk> <s> </s>, 256 byte pieces, pieces), with or without the
      leading '\u2581' (Llama 2, Mistral and Phi-3 add it; Gemma does not)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from cllm.formats.gguf_vocab import LLAMA3_SPLIT, QWEN2_SPLIT

    if kind == "gpt2":
        return tiny_tokenizer()
    if kind in ("llama3", "qwen2"):
        special = "<|endoftext|>"
        tok = Tokenizer(models.BPE())
        split = LLAMA3_SPLIT if kind == "llama3" else QWEN2_SPLIT
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])  # fmt: skip
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=380, special_tokens=[special], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )  # fmt: skip
        tok.train_from_iterator(_CORPUS, trainer)
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special,
                                       eos_token=special, unk_token=special, pad_token=special)  # fmt: skip
    prefix = kind == "spm"
    mark = "\u2581"
    learn = Tokenizer(models.BPE())
    learn.normalizer = normalizers.Replace(" ", mark)
    learn.pre_tokenizer = pre_tokenizers.Metaspace(replacement=mark, prepend_scheme="never")
    learn.train_from_iterator([(mark if prefix else "") + c for c in _CORPUS],
                              trainers.BpeTrainer(vocab_size=300, show_progress=False))  # fmt: skip
    import json

    learned = json.loads(learn.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True,
                               unk_token="<unk>", fuse_unk=True))  # fmt: skip
    norm = [normalizers.Replace(" ", mark)]
    tok.normalizer = normalizers.Sequence(([normalizers.Prepend(mark)] if prefix else []) + norm)
    steps = [decoders.Replace(mark, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<unk>")  # fmt: skip


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
