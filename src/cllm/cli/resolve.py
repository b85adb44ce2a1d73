"""Turning a CHECKPOINT argument into a Checkpoint, remembering how it was named."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cllm.formats.checkpoint import Checkpoint


@dataclass(frozen=True)
class Spec:
    text: str  # what the user named (after reading '-' from stdin)
    is_alias: bool

    @property
    def path(self) -> Path:
        return Path(self.text)


def read_spec(arg: str) -> Spec:
    from cllm.formats import aliases
    from cllm.formats.checkpoint import read_stdin_spec

    text = read_stdin_spec() if arg == "-" else arg
    spec = Spec(text, aliases.is_alias(text) and not Path(text).exists())
    if spec.is_alias and not aliases.is_converted(text):
        from cllm.cli._common import log

        log(f"first use of {text}: converting it once to fp32 safetensors in the cache")
    return spec


def open_spec(arg: str) -> tuple[Checkpoint, Spec]:
    from cllm.formats.checkpoint import open_checkpoint

    spec = read_spec(arg)
    return open_checkpoint(spec.text), spec
