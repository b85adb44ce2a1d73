"""The Checkpoint abstraction every command works on.

A checkpoint is a set of named tensors (transformers' names, read lazily one at
a time), an HF config dict, a tokenizer, and the provenance of whoever made it.
Readers for each on-disk format subclass it; commands never care which format
they were handed.
"""

from __future__ import annotations

import json
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cllm.errors import InputError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TensorInfo:
    """What a tensor is on disk, without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # storage type as the format names it: F32, BF16, Q4_1, ...
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class Checkpoint(ABC):
    path: Path
    format: str = field(init=False, default="")

    # -- tensors -------------------------------------------------------------
    @abstractmethod
    def tensor_infos(self) -> dict[str, TensorInfo]:
        """Every tensor, keyed by its transformers name, in file order."""

    @abstractmethod
    def get(self, name: str) -> torch.Tensor:
        """One tensor, dequantized to float32 if it is stored quantized."""

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.tensor_infos():
            yield name, self.get(name)

    # -- model description ---------------------------------------------------
    @property
    @abstractmethod
    def config(self) -> dict[str, Any]:
        """The transformers config (config.json) as a dict."""

    @abstractmethod
    def tokenizer_dir(self) -> Path:
        """A folder transformers' AutoTokenizer can load (materialised if needed)."""

    def tokenizer(self) -> Any:
        return load_tokenizer(self.tokenizer_dir())

    @property
    def provenance(self) -> dict[str, Any] | None:
        return None

    @property
    def gguf_kv(self) -> dict[str, Any]:
        """GGUF-only facts worth carrying through other formats (tokenizer pre-type, chat template)."""
        return {}

    @abstractmethod
    def files(self) -> list[Path]:
        """The files whose bytes make up this checkpoint (for hashing and size)."""

    @cached_property
    def sha256(self) -> str:
        from cllm.formats.hashing import files_sha256

        return files_sha256(self.files())

    @property
    def file_size(self) -> int:
        return sum(p.stat().st_size for p in self.files())

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "?")]
        return str(archs[0])

    @property
    def display_name(self) -> str:
        return str(self.path)

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


def parse_json_object(raw: Any) -> dict[str, Any] | None:
    """A JSON object stored as a string in file metadata; None when absent or malformed."""
    if not raw or not isinstance(raw, str):
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def load_tokenizer(folder: Path) -> Any:
    """transformers' AutoTokenizer, with a broken tokenizer reported as bad input."""
    import logging

    from transformers import AutoTokenizer

    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises bare Exception on malformed files
        raise InputError(
            f"cannot load the tokenizer in {folder}: {exc}", "Check tokenizer.json"
        ) from exc


def read_json_file(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputError(f"{what} not found: {path}") from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{what} {path} is not valid JSON ({exc})", "Check the file") from exc
    if not isinstance(data, dict):
        raise InputError(f"{what} {path} is not a JSON object")
    return data


def parse_stdin_spec(line: str) -> str:
    """A '-' argument: one line from stdin holding a path or a JSON record with a "path"."""
    text = line.strip()
    if not text:
        raise InputError(
            "'-' was given but stdin was empty", "Pipe a checkpoint path into the command"
        )
    if text.startswith("{"):
        try:
            record = json.loads(text)
        except ValueError as exc:
            raise InputError(f"stdin held invalid JSON: {exc}") from exc
        if not isinstance(record, dict) or not isinstance(record.get("path"), str):
            raise InputError('the JSON record on stdin has no "path" field')
        return str(record["path"])
    return text


def read_stdin_spec() -> str:
    if sys.stdin is None or sys.stdin.closed:
        raise InputError("'-' was given but there is no stdin")
    return parse_stdin_spec(sys.stdin.readline())


def open_checkpoint(spec: str | Path) -> Checkpoint:
    """Open a checkpoint from a path, a built-in alias, or '-' (stdin)."""
    from cllm.formats import aliases

    text = str(spec)
    if text == "-":
        text = read_stdin_spec()
    if aliases.is_alias(text) and not Path(text).exists():
        return open_checkpoint(aliases.resolve(text))
    path = Path(text).expanduser()
    if not path.exists():
        from cllm.formats import hub

        if hub.looks_like_hub_id(text):
            path = hub.download(text)
    if not path.exists():
        hint = "Give a path to a .safetensors or .gguf file or an HF folder"
        if aliases.ALIASES:
            hint += ", or an alias (" + ", ".join(sorted(aliases.ALIASES)) + ")"
        raise InputError(f"no such file or folder: {text}", hint)
    if path.is_dir():
        from cllm.formats.safetensors_io import SafetensorsCheckpoint

        return SafetensorsCheckpoint.from_folder(path)
    head = _read_head(path)
    if path.suffix == ".gguf" or head[:4] == b"GGUF":
        from cllm.formats.gguf_io import GGUFCheckpoint

        return GGUFCheckpoint(path)
    if path.suffix == ".safetensors":
        from cllm.formats.safetensors_io import SafetensorsCheckpoint

        return SafetensorsCheckpoint.from_file(path)
    if path.suffix == ".onnx":
        raise InputError(f"{path} is an ONNX model, which cllm cannot read as a checkpoint yet")
    raise InputError(
        f"cannot tell the format of {path}",
        "Use a .safetensors or .gguf file or an HF folder with config.json",
    )


def _read_head(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(8)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
