"""The registered families. Order matters only where two share a GGUF name: HF Mistral
is written as llama.cpp's `llama` (as llama.cpp's converter does), and a `llama` GGUF
reads back as Llama."""

from __future__ import annotations

from cllm.formats.arch import hparams as hp
from cllm.formats.arch.spec import (
    GEMMA3_AWQ,
    GEMMA3_TENSORS,
    LLAMA_TENSORS,
    PHI3_AWQ,
    PHI3_TENSORS,
    QWEN2_TENSORS,
    QWEN3_TENSORS,
    ArchSpec,
)
from cllm.formats.arch.structure import GEMMA3_STRUCTURE, LLAMA_STRUCTURE

LLAMA = ArchSpec(
    model_type="llama",
    hf_architecture="LlamaForCausalLM",
    gguf_arch="llama",
    label="Llama 2/3.x, SmolLM",
    tensors=LLAMA_TENSORS,
    write_hparams=hp.write_llama,
    read_hparams=hp.read_llama,
    features=("GQA", "RoPE (llama3 scaling as rope_freqs)"),
    permute_qk=True,
    extra_gguf=("rope_freqs.weight",),
    structure=LLAMA_STRUCTURE,
)
MISTRAL = ArchSpec(
    model_type="mistral",
    hf_architecture="MistralForCausalLM",
    gguf_arch="llama",
    label="Mistral",
    tensors=LLAMA_TENSORS,
    write_hparams=hp.write_llama,
    read_hparams=hp.read_llama,
    features=("GQA", "sliding window (not kept in GGUF: llama.cpp runs full attention)"),
    permute_qk=True,
    structure=LLAMA_STRUCTURE,
)
QWEN2 = ArchSpec(
    model_type="qwen2",
    hf_architecture="Qwen2ForCausalLM",
    gguf_arch="qwen2",
    label="Qwen2/2.5",
    tensors=QWEN2_TENSORS,
    write_hparams=hp.write_qwen,
    read_hparams=hp.read_qwen2,
    features=("GQA", "q/k/v biases"),
    structure=LLAMA_STRUCTURE,
)
QWEN3 = ArchSpec(
    model_type="qwen3",
    hf_architecture="Qwen3ForCausalLM",
    gguf_arch="qwen3",
    label="Qwen3",
    tensors=QWEN3_TENSORS,
    write_hparams=hp.write_qwen,
    read_hparams=hp.read_qwen3,
    features=("GQA", "QK-norm"),
    structure=LLAMA_STRUCTURE,
)
GEMMA3 = ArchSpec(
    model_type="gemma3_text",
    hf_architecture="Gemma3ForCausalLM",
    gguf_arch="gemma3",
    label="Gemma 3",
    tensors=GEMMA3_TENSORS,
    write_hparams=hp.write_gemma3,
    read_hparams=hp.read_gemma3,
    features=(
        "QK-norm",
        "sandwich norms",
        "norm weights stored as 1+w",
        "embeddings scaled by sqrt(hidden)",
        "local/global attention (5:1 sliding window)",
        "final logit soft-capping",
    ),  # fmt: skip
    norm_offset=1.0,
    embed_scale=True,
    rotary_per_layer_type=True,
    awq_groups=GEMMA3_AWQ,
    structure=GEMMA3_STRUCTURE,
)
PHI3 = ArchSpec(
    model_type="phi3",
    hf_architecture="Phi3ForCausalLM",
    gguf_arch="phi3",
    label="Phi-3/3.5/4-mini",
    tensors=PHI3_TENSORS,
    write_hparams=hp.write_phi3,
    read_hparams=hp.read_phi3,
    features=("fused qkv_proj and gate_up_proj", "partial rotary", "LongRoPE"),
    extra_gguf=("rope_factors_long.weight", "rope_factors_short.weight"),
    awq_groups=PHI3_AWQ,
    no_structure_reason="its q/k/v and gate/up projections are fused into single tensors",
)

ARCHS: tuple[ArchSpec, ...] = (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA3, PHI3)
BY_MODEL_TYPE: dict[str, ArchSpec] = {a.model_type: a for a in ARCHS}
