"""safetensors: strict header validation, lazy reading, streaming atomic writing.

Two layouts are read and written:
- an HF folder (config.json, tokenizer files, one or many *.safetensors shards
  with model.safetensors.index.json);
- a single .safetensors file that embeds config, tokenizer and provenance as
  JSON strings in `__metadata__`, so that one file is one model (as with GGUF).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cllm.errors import InputError
from cllm.formats.arch import check_shapes
from cllm.formats.checkpoint import Checkpoint, TensorInfo, parse_json_object, read_json_file

if TYPE_CHECKING:
    import torch

DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
MAX_HEADER = 100_000_000

META_CONFIG = "cllm.config"
META_TOKENIZER = "cllm.tokenizer"
META_PROVENANCE = "cllm.provenance"
META_GGUF_KV = "cllm.gguf_kv"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


@dataclass
class Header:
    tensors: dict[str, TensorInfo]
    offsets: dict[str, tuple[int, int]]
    metadata: dict[str, str]
    data_start: int


def read_header(path: Path) -> Header:
    """Parse and check a safetensors header without trusting anything in it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise InputError(
                    f"{path} is truncated: {size} bytes, shorter than a safetensors header"
                )
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise InputError(
                    f"{path}: header length {n} is larger than the file ({size} bytes)",
                    "The file is truncated or not safetensors",
                )
            if n > MAX_HEADER:
                raise InputError(f"{path}: header length {n} exceeds the 100 MB limit")
            raw = fh.read(n)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(
            f"{path}: header is not valid JSON", "The file is corrupt or not safetensors"
        ) from exc
    if not isinstance(header, dict):
        raise InputError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(f"{path}: __metadata__ must map strings to strings")
    data_len = size - 8 - n
    infos: dict[str, TensorInfo] = {}
    offsets: dict[str, tuple[int, int]] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise InputError(f"{path}: tensor {name} has a malformed header entry")
        dtype = entry.get("dtype")
        shape = entry.get("shape")
        off = entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise InputError(f"{path}: tensor {name} has unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise InputError(f"{path}: tensor {name} has a malformed shape {shape!r}")
        if not (isinstance(off, list) and len(off) == 2 and all(isinstance(o, int) for o in off)):
            raise InputError(f"{path}: tensor {name} has malformed data_offsets {off!r}")
        begin, end = off
        numel = 1
        for d in shape:
            numel *= d
        if not 0 <= begin <= end <= data_len:
            raise InputError(
                f"{path}: tensor {name} lies at bytes {begin}..{end}, outside the data ({data_len} bytes)",
                "The file is truncated or corrupt",
            )
        if end - begin != numel * DTYPE_SIZES[dtype]:
            raise InputError(
                f"{path}: tensor {name} has {end - begin} bytes but its shape needs {numel * DTYPE_SIZES[dtype]}"
            )
        infos[name] = TensorInfo(name, tuple(shape), dtype, end - begin)
        offsets[name] = (begin, end)
    spans = sorted(offsets.items(), key=lambda kv: kv[1])
    for (a, (_, a_end)), (b, (b_begin, _)) in zip(spans, spans[1:], strict=False):
        if b_begin < a_end:
            raise InputError(f"{path}: tensors {a} and {b} overlap", "The file is corrupt")
    return Header(infos, offsets, dict(metadata), 8 + n)


@dataclass
class SafetensorsCheckpoint(Checkpoint):
    shards: list[Path] = field(default_factory=list)
    folder: Path | None = None
    _config: dict[str, Any] = field(default_factory=dict)
    _metadata: dict[str, str] = field(default_factory=dict)
    _where: dict[str, Path] = field(default_factory=dict)
    _infos: dict[str, TensorInfo] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.format = "safetensors"
        self._handles: dict[Path, Any] = {}
        self._packed: dict[str, Any] = {}
        self._spans: dict[str, tuple[int, int, TensorInfo]] = {}  # raw tensors as stored

    # -- constructors ----------------------------------------------------------
    @classmethod
    def from_folder(cls, folder: Path) -> SafetensorsCheckpoint:
        folder = Path(folder)
        if not (folder / "config.json").exists():
            raise InputError(
                f"{folder} is a folder without config.json",
                "Give an HF model folder (config.json + *.safetensors) or a model file",
            )
        config = read_json_file(folder / "config.json", "config.json")
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = read_json_file(index, "safetensors index").get("weight_map", {})
            shards = sorted({folder / f for f in weight_map.values()})
        else:
            shards = sorted(folder.glob("*.safetensors"))
        if not shards:
            if list(folder.glob("*.bin")):
                raise InputError(
                    f"{folder} holds only pickled *.bin weights",
                    "Convert them to safetensors first",
                )
            raise InputError(f"{folder} has config.json but no *.safetensors weights")
        ckpt = cls(path=folder, shards=shards, folder=folder, _config=config)
        ckpt._load_headers()
        return ckpt

    @classmethod
    def from_file(cls, path: Path) -> SafetensorsCheckpoint:
        path = Path(path)
        header = read_header(path)
        if META_CONFIG in header.metadata:
            try:
                config = json.loads(header.metadata[META_CONFIG])
            except ValueError as exc:
                raise InputError(f"{path}: embedded config is not valid JSON") from exc
            if not isinstance(config, dict):
                raise InputError(f"{path}: embedded config is not a JSON object")
            ckpt = cls(path=path, shards=[path], _config=config)
        elif (path.parent / "config.json").exists():
            return cls.from_folder(path.parent)
        else:
            raise InputError(
                f"{path} embeds no config and has no config.json beside it",
                "Give the model folder, or a single-file checkpoint written by cllm",
            )
        ckpt._load_headers({path: header})
        return ckpt

    def _load_headers(self, known: dict[Path, Header] | None = None) -> None:
        known = known or {}
        for shard in self.shards:
            if not shard.exists():
                raise InputError(f"shard {shard} named by the index is missing")
            header = known.get(shard) or read_header(shard)
            for name, info in header.tensors.items():
                if name in self._infos:
                    raise InputError(f"tensor {name} appears in two shards")
                self._infos[name] = info
                self._where[name] = shard
                begin, end = header.offsets[name]
                self._spans[name] = (header.data_start + begin, end - begin, info)
            if not self._metadata:
                self._metadata = header.metadata
        self._packed = self._map_packed_linears()
        check_shapes(self._config, {n: i.shape for n, i in self._infos.items()}, str(self.path))

    def _map_packed_linears(self) -> dict[str, Any]:
        """compressed-tensors checkpoints: present each packed Linear as its dense `.weight`.

        Commands then see an ordinary model (dequantized on read), so a quantized output
        pipes into eval, export or another quantize like any checkpoint.
        """
        qc = self._config.get("quantization_config")
        if not isinstance(qc, dict):
            return {}
        if qc.get("quant_method") != "compressed-tensors":
            return self._map_foreign_linears()
        from cllm.formats import compressed_tensors as ct

        spec = ct.spec_from_config(self._config)
        packed: dict[str, Any] = {}
        for name in [n for n in self._infos if n.endswith(".weight_packed")]:
            prefix = name[: -len(".weight_packed")]
            shape_name = prefix + ".weight_shape"
            if shape_name not in self._infos:
                raise InputError(f"{self.path}: packed tensor {prefix} has no weight_shape")
            shape = tuple(int(d) for d in self.get(shape_name).tolist())
            group = [n for n in self._infos if n.startswith(prefix + ".weight_")]
            nbytes = sum(self._infos[n].nbytes for n in group)
            for n in group:
                del self._infos[n]
            self._infos[prefix + ".weight"] = TensorInfo(
                prefix + ".weight", shape, f"CT_INT{spec.bits}", nbytes
            )
            packed[prefix + ".weight"] = (prefix, spec, set(group))
        return packed

    def _map_foreign_linears(self) -> dict[str, Any]:
        """GPTQ, AWQ and AutoRound checkpoints: each `<p>.qweight` (with its qzeros, scales
        and g_idx) becomes `<p>.weight`, dequantized on read."""
        from cllm.formats import foreign_quant as fq

        spec = fq.spec_from_config(self._config)
        if spec is None:
            return {}
        packed: dict[str, Any] = {}
        for name in [n for n in self._infos if n.endswith(".qweight")]:
            prefix = name[: -len(".qweight")]
            parts = {k: f"{prefix}.{k}" for k in fq.PARTS if f"{prefix}.{k}" in self._infos}
            missing = [k for k in fq.PARTS[:3] if k not in parts]
            if missing:
                raise InputError(f"{self.path}: quantized linear {prefix} has no {missing[0]}")
            shape = fq.linear_shape({k: self._infos[n].shape for k, n in parts.items()}, spec)
            nbytes = sum(self._infos[n].nbytes for n in parts.values())
            for n in parts.values():
                del self._infos[n]
            self._infos[prefix + ".weight"] = TensorInfo(
                prefix + ".weight", shape, spec.dtype, nbytes
            )
            packed[prefix + ".weight"] = ("foreign", spec, parts)
        if not packed:
            raise InputError(
                f"{self.path}: the config declares {spec.label} weights but no tensor is quantized"
            )
        return packed

    # -- Checkpoint API ----------------------------------------------------------
    def tensor_infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def get(self, name: str) -> torch.Tensor:
        packed = self._packed.get(name)
        if packed is not None and packed[0] == "foreign":
            from cllm.formats.foreign_quant import dequantize

            _, spec, parts = packed
            return dequantize({k: self._raw_get(n) for k, n in parts.items()}, spec)
        if packed is not None:
            from cllm.formats.compressed_tensors import dequantize_checkpoint_linear

            prefix, spec, names = packed
            return dequantize_checkpoint_linear(self._raw_get, prefix, spec, names)
        return self._raw_get(name)

    def packed_linear(
        self, name: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
        """The stored integers of a packed Linear's `.weight` (codes, scale, zero, group size),
        for writers that keep them exactly; None for a tensor stored as floats."""
        packed = self._packed.get(name)
        if packed is None or packed[0] == "foreign" or f"{packed[0]}.weight_g_idx" in packed[2]:
            return None  # other layouts, or groups that are not runs of columns
        from cllm.formats.compressed_tensors import read_checkpoint_linear

        prefix, spec, names = packed
        return read_checkpoint_linear(self._raw_get, prefix, spec, names)

    def _raw_get(self, name: str) -> torch.Tensor:
        """Read one tensor's bytes with a plain read, not a memory map.

        A memory map would leave every tensor read so far resident in this process
        (counted in its RSS until the map closes); a read into a fresh buffer keeps the
        footprint of a tensor-by-tensor pass near the largest tensor.
        """
        import torch

        shard = self._where[name]
        start, nbytes, info = self._spans[name]
        handle = self._handles.get(shard)
        if handle is None:
            handle = open(shard, "rb")  # noqa: SIM115 - kept open for the checkpoint's lifetime
            self._handles[shard] = handle
        dtype = _torch_dtype(info.dtype)
        if nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        buf = bytearray(nbytes)
        handle.seek(start)
        if handle.readinto(buf) != nbytes:
            raise InputError(f"{shard} is truncated at tensor {name}")
        return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)

    @property
    def config(self) -> dict[str, Any]:
        return self._config

    @property
    def metadata(self) -> dict[str, str]:
        return self._metadata

    @cached_property
    def provenance(self) -> dict[str, Any] | None:  # type: ignore[override]
        return parse_json_object(self._metadata.get(META_PROVENANCE))

    @property
    def gguf_kv(self) -> dict[str, Any]:
        return parse_json_object(self._metadata.get(META_GGUF_KV)) or {}

    def tokenizer_dir(self) -> Path:
        if self.folder is not None:
            if (
                not (self.folder / "tokenizer.json").exists()
                and not (self.folder / "tokenizer_config.json").exists()
            ):
                raise InputError(
                    f"{self.folder} has no tokenizer files",
                    "Copy the tokenizer files into the folder",
                )
            return self.folder
        raw = self._metadata.get(META_TOKENIZER)
        if not raw:
            raise InputError(f"{self.path} embeds no tokenizer")
        from cllm.formats.hashing import bytes_sha256
        from cllm.paths import cache_dir

        files = json.loads(raw)
        target = cache_dir() / "tokenizers" / bytes_sha256(raw.encode())[:16]
        if not (target / "tokenizer_config.json").exists():
            tmp = target.with_name(target.name + ".tmp")
            tmp.mkdir(parents=True, exist_ok=True)
            for fname, content in files.items():
                if "/" in fname or fname.startswith("."):
                    raise InputError(
                        f"{self.path}: embedded tokenizer file name {fname!r} is not allowed"
                    )
                (tmp / fname).write_text(content, encoding="utf-8")
            if not target.exists():
                tmp.replace(target)
        return target

    def files(self) -> list[Path]:
        extra = []
        if self.folder is not None and (self.folder / "config.json").exists():
            extra.append(self.folder / "config.json")
        return list(self.shards) + extra


# -- writing -------------------------------------------------------------------
_TORCH_TO_ST = {
    "torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16", "torch.float64": "F64",
    "torch.int64": "I64", "torch.int32": "I32", "torch.int16": "I16", "torch.int8": "I8",
    "torch.uint8": "U8", "torch.bool": "BOOL",
}  # fmt: skip


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor to stream into a file: its header entry now, its bytes later."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    produce: Callable[[], torch.Tensor]


def write_safetensors_file(
    path: Path, tensors: Iterable[PlannedTensor], metadata: dict[str, str]
) -> None:
    """Write one safetensors file tensor by tensor, so peak memory is one tensor.

    The header is laid out from shapes and dtypes first; each tensor is then
    produced, checked against its planned shape, and appended.
    """
    import torch

    planned = list(tensors)
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for t in planned:
        numel = 1
        for d in t.shape:
            numel *= d
        size = numel * DTYPE_SIZES[t.dtype]
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((8 - len(raw) % 8) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for t in planned:
            tensor = t.produce().contiguous()
            got = _TORCH_TO_ST.get(str(tensor.dtype))
            if tuple(tensor.shape) != t.shape or got != t.dtype:
                raise RuntimeError(
                    f"tensor {t.name}: produced {got}{list(tensor.shape)}, planned {t.dtype}{list(t.shape)}"
                )
            fh.write(tensor.reshape(-1).view(torch.uint8).numpy().data)


_ST_TORCH_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16",
    "U32": "uint32", "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip


def _torch_dtype(code: str) -> Any:
    import torch

    dtype = getattr(torch, _ST_TORCH_NAMES[code], None)
    if dtype is None:
        raise InputError(f"safetensors dtype {code} is not supported by this torch")
    return dtype


def torch_dtype_name(dtype: Any) -> str:
    return _TORCH_TO_ST[str(dtype)]
