"""The one place that decides what a CHECKPOINT argument is.

A command's input may be a checkpoint (HF folder, .safetensors, .gguf, an alias, a hub id),
an ONNX export (folder or .onnx file) or an edge bundle (folder with manifest.json), named
directly or piped in as '-'. Every command resolves its argument here, so '-', aliases and
the ONNX/bundle distinction behave the same in info, eval, export, bench, quantize and prune.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cllm.errors import InputError, UsageError

if TYPE_CHECKING:
    from cllm.formats.checkpoint import Checkpoint
    from cllm.formats.onnx_io import OnnxCheckpoint

CHECKPOINT, ONNX, BUNDLE = "checkpoint", "onnx", "bundle"
_NAMES = {CHECKPOINT: "a checkpoint", ONNX: "an ONNX export", BUNDLE: "an edge bundle"}


def input_kind(path: Path) -> str:
    """checkpoint, onnx or bundle, from what is on disk (a missing path counts as a
    checkpoint: aliases and hub ids are resolved by `open_checkpoint`)."""
    from cllm.formats.onnx_io import is_onnx

    p = Path(path)
    if p.is_dir() and (p / "manifest.json").is_file():
        return BUNDLE
    if is_onnx(p):
        return ONNX
    return CHECKPOINT


@dataclass
class Source:
    """A resolved input: what the user named, what it is, and (for checkpoints) the open
    checkpoint. `sha256` and `provenance` are what an output's provenance names as parent."""

    text: str  # what the user named (after reading '-' from stdin)
    is_alias: bool
    kind: str  # checkpoint | onnx | bundle
    checkpoint: Checkpoint | None = None

    @property
    def path(self) -> Path:
        """The path as named (an alias is a bare name: outputs go to the current folder)."""
        return Path(self.text)

    @property
    def location(self) -> Path:
        """Where the data really is (an alias's converted cache file)."""
        return self.checkpoint.path if self.checkpoint is not None else self.path

    @cached_property
    def onnx(self) -> OnnxCheckpoint:
        from cllm.formats.onnx_io import OnnxCheckpoint

        return OnnxCheckpoint(self.path)

    @cached_property
    def sha256(self) -> str:
        if self.checkpoint is not None:
            return self.checkpoint.sha256
        from cllm.formats.hashing import artifact_files, files_sha256

        return files_sha256(artifact_files(self.path))

    @cached_property
    def provenance(self) -> dict[str, Any] | None:
        if self.checkpoint is not None:
            return self.checkpoint.provenance
        if self.kind == ONNX:
            from cllm.formats.onnx_io import read_side_file

            return read_side_file(self.path).get("provenance")
        try:
            manifest = json.loads((self.path / "manifest.json").read_text())
        except (OSError, ValueError):
            return None
        prov = manifest.get("provenance") if isinstance(manifest, dict) else None
        return prov if isinstance(prov, dict) else None


def resolve_input(arg: str, accept: tuple[str, ...] = (CHECKPOINT,), open_: bool = True) -> Source:
    """Read '-' from stdin, tell aliases from paths, classify, and open a checkpoint (unless
    `open_` is False). Inputs of a kind the command does not take are refused up front."""
    from cllm.formats import aliases
    from cllm.formats.checkpoint import read_stdin_spec

    text = read_stdin_spec() if arg == "-" else arg
    is_alias = aliases.is_alias(text) and not Path(text).exists()
    kind = CHECKPOINT if is_alias else input_kind(Path(text))
    if kind not in accept:
        wanted = " or ".join(_NAMES[k] for k in accept)
        raise UsageError(
            f"{text} is {_NAMES[kind]}; this command takes {wanted}",
            "Give a safetensors or GGUF checkpoint" if CHECKPOINT in accept else "",
        )
    src = Source(text, is_alias, kind)
    if kind == CHECKPOINT and open_:
        if is_alias and not aliases.is_converted(text):
            logging.getLogger("cllm").info(
                f"first use of {text}: converting it once to fp32 safetensors in the cache"
            )
        from cllm.formats.checkpoint import open_checkpoint

        src.checkpoint = open_checkpoint(text)
    return src


def require_checkpoint(src: Source) -> Checkpoint:
    if src.checkpoint is None:
        raise InputError(f"{src.text} is not an open checkpoint")
    return src.checkpoint
