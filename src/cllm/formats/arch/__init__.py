"""Architecture knowledge: one `ArchSpec` per model family, read by every command.

Adding a family means one registration in `families.py` and a tiny config in
`cllm.testing.tiny`; readers, writers, quantizers, pruners and exporters take
names, shapes, hyperparameters and layer layout from the spec.
"""

from __future__ import annotations

from typing import Any

from cllm.errors import InputError
from cllm.formats.arch.families import ARCHS, BY_MODEL_TYPE
from cllm.formats.arch.spec import LAYER_PREFIX, ArchSpec, AwqGroup, check_shapes_for
from cllm.formats.arch.structure import DECODER_LAYERS, Layers, Structure, UnitAxes

__all__ = [
    "ARCHS",
    "LAYER_PREFIX",
    "ArchSpec",
    "AwqGroup",
    "Layers",
    "Structure",
    "UnitAxes",
    "check_shapes",
    "layers_for_config",
    "spec_for_config",
    "spec_for_gguf",
    "structure_for_config",
    "supported_model_types",
]


def supported_model_types() -> list[str]:
    return sorted(BY_MODEL_TYPE)


def _supported_line() -> str:
    return "Supported: " + ", ".join(f"{a.model_type} ({a.label})" for a in ARCHS)


def spec_for_gguf(arch: str) -> ArchSpec:
    for spec in ARCHS:  # the first registration of a GGUF name owns it (llama before mistral)
        if spec.gguf_arch == arch:
            return spec
    raise InputError(
        f"GGUF architecture '{arch}' is not supported",
        "Supported: " + ", ".join(dict.fromkeys(a.gguf_arch for a in ARCHS)),
    )


def spec_for_config(config: dict[str, Any]) -> ArchSpec:
    mt = str(config.get("model_type", ""))
    spec = BY_MODEL_TYPE.get(mt)
    if spec is not None:
        return spec
    if mt == "gemma3":
        raise InputError(
            "this is the multimodal Gemma 3 checkpoint (model_type gemma3)",
            "cllm compresses the text-only Gemma3ForCausalLM (model_type gemma3_text)",
        )
    raise InputError(f"model type '{mt or '?'}' is not supported", _supported_line())


def structure_for_config(config: dict[str, Any]) -> Structure:
    """The tensor layout pruning works on; a family without one is refused up front."""
    spec = spec_for_config(config)
    if spec.structure is None:
        raise InputError(
            f"{spec.label} cannot be pruned structurally: {spec.no_structure_reason}",
            "Depth pruning (--drop-layers) and unstructured pruning work for it",
        )
    return spec.structure


def layers_for_config(config: dict[str, Any]) -> Layers:
    """How the family's decoder layers are named and counted (depth pruning's view)."""
    spec = spec_for_config(config)
    return spec.structure if spec.structure is not None else DECODER_LAYERS


def check_shapes(config: dict[str, Any], shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Reject a checkpoint whose tensors disagree with its config before any work starts.
    A family cllm does not know is left to the command that needs it to refuse."""
    spec = BY_MODEL_TYPE.get(str(config.get("model_type", "")))
    if spec is not None:
        check_shapes_for(spec, config, shapes, where)
