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
    return Spec(text, aliases.is_alias(text) and not Path(text).exists())


def open_spec(arg: str) -> tuple[Checkpoint, Spec]:
    from cllm.formats.checkpoint import open_checkpoint

    spec = read_spec(arg)
    return open_checkpoint(spec.text), spec
