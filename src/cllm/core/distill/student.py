"""The student: built from a checkpoint (or some of its layers), made trainable, saved back.

Sparsity: the zeros of a pruned student are a mask that every optimizer step keeps (the
gradient and the weight are multiplied by it), so Wanda's or SparseGPT's pattern survives
distillation, unless the user asks otherwise. Which matrices are pruned comes from the
provenance chain (a magnitude, Wanda or SparseGPT step: a decoder-layer matrix with 1% or
more exact zeros); without provenance, from 20% exact zeros up. Zeros alone are not
enough: a dequantized 4-bit model has a few percent of exact zeros in every matrix
(the grid's zero point), and freezing those would be a silent, arbitrary constraint. LoRA adapters come from peft and are merged into the weights before
saving (and the mask re-applied to the merged weight), so the saved student is a plain
checkpoint of the input's architecture that exports to GGUF or ONNX like any other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from cllm.core.distill.config import DistillConfig
from cllm.core.prune.structured import TORCH_DTYPES, out_dtype
from cllm.errors import UsageError
from cllm.formats.checkpoint import Checkpoint
from cllm.formats.safetensors_io import PlannedTensor

SPARSE_FRACTION = 0.20  # without provenance: this share of exact zeros marks a matrix pruned
PRUNED_FRACTION = 0.01  # with a pruning step in the provenance
UNSTRUCTURED = ("magnitude", "wanda", "sparsegpt")


@dataclass
class Student:
    model: Any  # transformers model, or peft's wrapper around it
    config: dict[str, Any]  # the HF config the saved student carries
    names: dict[str, str]  # saved tensor name -> storage dtype, in the input's order
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # param name -> keep mask
    layers_from: list[int] | None = None  # original layer of each student layer (--init)
    lora: bool = False

    @property
    def base(self) -> Any:
        """The transformers model under any peft wrapper."""
        return self.model.get_base_model() if self.lora else self.model

    def counts(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        return trainable, total


def require_float_student(ckpt: Checkpoint, dequantize: bool) -> None:
    """A packed-quantized student cannot take gradient steps; training its dequantized copy
    silently writes a float model many times its size."""
    from cllm.core.quantize.job import stored_types

    quantized = stored_types(ckpt)
    if quantized and not dequantize:
        raise UsageError(
            f"the student {ckpt.display_name} is quantized ({', '.join(quantized)}); distillation trains float weights",
            "Distill before quantizing, or add --dequantize to train its dequantized weights",
        )


def build_student(ckpt: Checkpoint, cfg: DistillConfig, attn_eager: bool = False) -> Student:
    from cllm.core.eval.backends import build_torch_model
    from cllm.formats.arch import layers_for_config

    require_float_student(ckpt, cfg.dequantize)
    infos = ckpt.tensor_infos()
    layers_from = None
    config = dict(ckpt.config)
    config.pop("quantization_config", None)
    if cfg.init_layers is not None:
        from cllm.core.prune.depth import keep_layers

        st = layers_for_config(ckpt.config)
        n = int(ckpt.config[st.layers_key])
        bad = [i for i in cfg.init_layers if not 0 <= i < n]
        if bad:
            raise UsageError(
                f"--init layers: {bad[0]} is not a layer of {ckpt.display_name} (it has {n}: 0-{n - 1})"
            )
        layers_from = sorted(cfg.init_layers)
        config, plans = keep_layers(ckpt, layers_from)
        names = {p.name: out_dtype(p.dtype) for p in plans}
        tensors = ((p.name, p.produce()) for p in plans)
        model = build_torch_model(
            ckpt, config_dict=config, tensors=tensors,
            attn_implementation="eager" if attn_eager else None,
        )  # fmt: skip
    else:
        names = {name: out_dtype(info.dtype) for name, info in infos.items()}
        model = build_torch_model(ckpt, attn_implementation="eager" if attn_eager else None)
    model.train()
    model.config.use_cache = False
    student = Student(model, config, names, layers_from=layers_from)
    if cfg.keep_sparsity:
        student.masks = find_masks(model, config, pruned_by_provenance(ckpt.provenance))
    _freeze(student, cfg.freeze)
    if cfg.lora_rank:
        if student.masks:
            raise UsageError(
                f"--lora-rank on a pruned student: the merged adapters would fill the zeros of {len(student.masks)} matrices",
                "Train it fully (drop --lora-rank), or add --no-keep-sparsity to let them fill",
            )
        with torch.random.fork_rng():  # peft draws the adapters' start from the global RNG
            torch.manual_seed(cfg.seed)
            _add_lora(student, cfg)
    return student


def pruned_by_provenance(prov: dict[str, Any] | None) -> bool | None:
    """True if an ancestor was pruned to zeros, False if the chain says it was not, None
    when there is no provenance to ask."""
    from cllm.formats.provenance import chain

    steps = chain(prov)
    if not steps:
        return None
    return any(
        s.get("op") == "prune" and (s.get("params") or {}).get("method") in UNSTRUCTURED
        for s in steps
    )


def find_masks(model: Any, config: dict[str, Any], pruned: bool | None) -> dict[str, torch.Tensor]:
    """Keep-masks of the decoder layers' weight matrices that arrive pruned (see the
    module); embeddings and the head are never pruned, so never masked."""
    from cllm.formats.arch import layers_for_config

    if pruned is False:
        return {}
    prefix = layers_for_config(config).layer_prefix
    least = PRUNED_FRACTION if pruned else SPARSE_FRACTION
    masks = {}
    for name, p in model.named_parameters():
        if p.dim() != 2 or not name.startswith(prefix):
            continue
        zeros = p.detach() == 0
        if float(zeros.float().mean()) >= least:
            masks[name] = ~zeros
    return masks


def _freeze(student: Student, patterns: list[str]) -> None:
    if not patterns:
        return
    regexes = [re.compile(p) for p in patterns]
    hit = 0
    for name, p in student.model.named_parameters():
        if any(r.search(name) for r in regexes):
            p.requires_grad_(False)
            hit += 1
    if hit == 0:
        raise UsageError(
            f"--freeze {', '.join(patterns)} matches no parameter",
            "Names look like model.layers.0.mlp.up_proj.weight or model.embed_tokens.weight",
        )
    if not any(p.requires_grad for p in student.model.parameters()):
        raise UsageError("--freeze leaves nothing to train", "Freeze fewer parameters")


def _add_lora(student: Student, cfg: DistillConfig) -> None:
    """peft LoRA on every linear layer of the decoder layers; the rest is frozen."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UsageError(
            "--lora-rank needs peft, which is not installed", "pip install 'cllm[lora]' (or peft)"
        ) from None
    from cllm.formats.arch import layers_for_config

    prefix = layers_for_config(student.config).layer_prefix
    targets = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, mod in student.model.named_modules()
            if name.startswith(prefix) and isinstance(mod, torch.nn.Linear)
        }
    )
    lcfg = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank,
        target_modules=targets,
        lora_dropout=0.0,
        bias="none",
    )
    student.model = get_peft_model(student.model, lcfg)
    student.lora = True


def apply_masks(student: Student, grads: bool = False) -> None:
    """Zero what the masks say: the gradients (before a step) or the weights (after)."""
    if not student.masks:
        return
    params = dict(student.base.named_parameters())
    with torch.no_grad():
        for name, mask in student.masks.items():
            p = params.get(name)
            if p is None:
                p = params.get(_lora_base_name(name))
            if p is None:
                continue
            if grads:
                if p.grad is not None:
                    p.grad.mul_(mask)
            else:
                p.mul_(mask)


def _lora_base_name(name: str) -> str:
    # peft moves a wrapped Linear's weight to <module>.base_layer.weight
    head, _, leaf = name.rpartition(".")
    return f"{head}.base_layer.{leaf}"


def merged_state(student: Student) -> dict[str, torch.Tensor]:
    """The trained weights under the input's tensor names: LoRA merged, masks re-applied."""
    model = student.model
    if student.lora:
        model = model.merge_and_unload()
        student.model = model
        student.lora = False
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for name, mask in student.masks.items():
        if name in state:
            state[name] = state[name] * mask
    return state


def student_plans(student: Student) -> list[PlannedTensor]:
    state = merged_state(student)
    tied = bool(student.config.get("tie_word_embeddings"))
    plans = []
    for name, dtype in student.names.items():
        tensor = state.get(name)
        if tensor is None and tied and name == "lm_head.weight":
            tensor = state.get("model.embed_tokens.weight")
        if tensor is None:
            raise UsageError(f"the trained student has no tensor {name}")

        def produce(t: torch.Tensor = tensor, d: str = dtype) -> torch.Tensor:
            return t.to(TORCH_DTYPES[d]).contiguous()

        plans.append(PlannedTensor(name, tuple(tensor.shape), dtype, produce))
    return plans
