"""GGUF: strict header validation, lazy per-tensor dequantized reading, streaming writing.

Reading maps llama.cpp's tensor names and hyperparameters to transformers'
(see `arch.py`), so a GGUF is a checkpoint like any other. Writing uses gguf-py's
numpy quantizers for the types it can produce and the tokenizer fields llama.cpp
needs, so the file loads in llama.cpp.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cllm.errors import InputError, UsageError
from cllm.formats.arch import ArchSpec, check_shapes, spec_for_config, spec_for_gguf
from cllm.formats.checkpoint import Checkpoint, TensorInfo, parse_json_object

if TYPE_CHECKING:
    import torch

PROVENANCE_KEY = "cllm.provenance"
# GGUF keys carried through other formats so a round trip keeps them
CARRIED_KEYS = (
    "tokenizer.ggml.pre",
    "tokenizer.chat_template",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token",
    "tokenizer.ggml.add_space_prefix",
    "general.name",
)

# the K types cllm packs itself (cllm.formats.kquants), byte-identical to llama.cpp
K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# types gguf-py can quantize in numpy, that cllm therefore writes itself
WRITABLE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")

_SCALAR = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_MAX_DIMS = 4


class _Cursor:
    """Bounds-checked reads over the file bytes, so a lying header gives a clear error."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise InputError(
                f"{self.path}: {what} runs past the end of the file (needs {n} bytes at offset {self.pos}, file has {len(self.buf)})",
                "The file is truncated or corrupt",
            )
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", f"length of {what}")
        raw = self.take(n, f"{what} (a string of {n} bytes)")
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{self.path}: {what} is not UTF-8") from exc


def validate_gguf(path: Path) -> None:
    """Walk the whole GGUF header with bounds checks before gguf-py touches it."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed by the `with fh` below
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    with fh:
        size = path.stat().st_size
        if size < 24:
            raise InputError(f"{path} is truncated: {size} bytes, shorter than a GGUF header")
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            # slicing an mmap copies, so no buffer export outlives an error and close() works
            cur = _Cursor(mm, path)
            magic = bytes(cur.take(4, "magic"))
            if magic != b"GGUF":
                raise InputError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
            version = cur.unpack("<I", "version")
            if version not in (2, 3):
                raise InputError(
                    f"{path}: GGUF version {version} is not supported",
                    "cllm reads GGUF versions 2 and 3",
                )
            n_tensors = cur.unpack("<Q", "tensor count")
            n_kv = cur.unpack("<Q", "key/value count")
            # every tensor info needs at least 8+4+8+4+8 bytes, every kv at least 8+4+1
            if n_tensors * 32 > size or n_kv * 13 > size:
                raise InputError(
                    f"{path}: header claims {n_tensors} tensors and {n_kv} keys, more than a {size}-byte file can hold",
                    "The file is truncated or corrupt",
                )
            alignment = 32
            for _ in range(n_kv):
                key = cur.string("a key name")
                vtype = cur.unpack("<I", f"type of key {key}")
                value = _skip_value(cur, vtype, key)
                if key == "general.alignment" and isinstance(value, int):
                    if value <= 0 or value & (value - 1):
                        raise InputError(f"{path}: general.alignment {value} is not a power of two")
                    alignment = value
            infos = []
            for i in range(n_tensors):
                name = cur.string(f"name of tensor {i}")
                n_dims = cur.unpack("<I", f"rank of tensor {name}")
                if n_dims < 1 or n_dims > _MAX_DIMS:
                    raise InputError(f"{path}: tensor {name} has {n_dims} dimensions")
                dims = [cur.unpack("<Q", f"shape of tensor {name}") for _ in range(n_dims)]
                ttype = cur.unpack("<I", f"type of tensor {name}")
                offset = cur.unpack("<Q", f"offset of tensor {name}")
                try:
                    qtype = GGMLQuantizationType(ttype)
                    block, type_size = GGML_QUANT_SIZES[qtype]
                except (ValueError, KeyError):
                    raise InputError(
                        f"{path}: tensor {name} has unknown quantization type {ttype}",
                        "The file may come from a newer llama.cpp than this gguf library knows",
                    ) from None
                if dims[0] % block:
                    raise InputError(
                        f"{path}: tensor {name} row length {dims[0]} is not a multiple of {qtype.name}'s block {block}"
                    )
                numel = 1
                for d in dims:
                    numel *= d
                infos.append((name, offset, numel // block * type_size))
            data_start = -(-cur.pos // alignment) * alignment
            spans = []
            for name, offset, nbytes in infos:
                if offset % alignment or data_start + offset + nbytes > size:
                    raise InputError(
                        f"{path}: tensor {name} data (offset {offset}, {nbytes} bytes) lies outside the file",
                        "The file is truncated or corrupt",
                    )
                spans.append((offset, offset + nbytes, name))
            spans.sort()
            for (_, a_end, a), (b_begin, _, b) in zip(spans, spans[1:], strict=False):
                if b_begin < a_end:
                    raise InputError(f"{path}: tensors {a} and {b} overlap", "The file is corrupt")
        finally:
            del cur
            mm.close()


def _skip_value(cur: _Cursor, vtype: int, key: str) -> Any:
    if vtype in _SCALAR:
        return cur.unpack(_SCALAR[vtype], f"value of key {key}")
    if vtype == 8:
        return cur.string(f"value of key {key}")
    if vtype == 9:
        etype = cur.unpack("<I", f"element type of key {key}")
        count = cur.unpack("<Q", f"length of array {key}")
        if etype in _SCALAR:
            cur.take(count * struct.calcsize(_SCALAR[etype]), f"array {key} ({count} elements)")
        elif etype == 8:
            if count * 8 > len(cur.buf):
                raise InputError(
                    f"{cur.path}: array {key} claims {count} strings, more than the file can hold"
                )
            for _ in range(count):
                n = cur.unpack("<Q", f"a string in array {key}")
                cur.take(n, f"a string of {n} bytes in array {key}")
        else:
            raise InputError(f"{cur.path}: array {key} has unsupported element type {etype}")
        return None
    raise InputError(f"{cur.path}: key {key} has unknown value type {vtype}")


@dataclass
class GGUFCheckpoint(Checkpoint):
    _names: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from gguf import GGUFReader

        self.format = "gguf"
        validate_gguf(self.path)
        try:
            self.reader = GGUFReader(self.path, "r")
        except (ValueError, IndexError, OSError) as exc:
            raise InputError(f"{self.path}: GGUF could not be parsed ({exc})") from exc
        self.gguf_arch = str(self.kv("general.architecture", ""))
        self.spec: ArchSpec = spec_for_gguf(self.gguf_arch)
        n_layers = int(self.kv(f"{self.gguf_arch}.block_count", 0) or 0)
        extra: dict[str, Any] = {}
        for t in self.reader.tensors:
            hf = self.spec.hf_name(t.name, n_layers)
            if hf is None:
                if t.name in self.spec.extra_gguf:
                    extra[t.name] = t
                    continue
                raise InputError(
                    f"{self.path}: tensor {t.name} has no known transformers name for {self.gguf_arch}"
                )
            self._names[hf] = t
        embd = self._names.get("model.embed_tokens.weight")
        n_vocab = int(embd.shape[-1]) if embd is not None else 0

        def extra_tensor(name: str) -> np.ndarray | None:
            from gguf.quants import dequantize

            t = extra.get(name)
            return None if t is None else dequantize(t.data, t.tensor_type).astype(np.float32)

        suffixes = {n.split(".", 3)[3] for n in self._names if n.startswith("model.layers.")}
        self._config = {
            "architectures": [self.spec.hf_architecture],
            "model_type": self.spec.model_type,
            **self.spec.read_hparams(self.kv, self.gguf_arch, n_vocab, extra_tensor, suffixes),
        }
        self._config["tie_word_embeddings"] = "lm_head.weight" not in self._names
        check_shapes(
            self._config, {n: i.shape for n, i in self.tensor_infos().items()}, str(self.path)
        )

    def kv(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except (ValueError, IndexError, UnicodeDecodeError):
            return default

    @cached_property
    def _infos(self) -> dict[str, TensorInfo]:
        out = {}
        for hf, t in self._names.items():
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            out[hf] = TensorInfo(hf, shape, t.tensor_type.name, int(t.n_bytes))
        return out

    def tensor_infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def get_numpy(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        t = self._names[name]
        arr = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        arr = arr.reshape(self._infos[name].shape)
        return self.spec.from_gguf(name, arr, self._config)

    def get(self, name: str) -> torch.Tensor:
        import torch

        arr = self.get_numpy(name)
        if not arr.flags.writeable or not arr.flags.c_contiguous:
            arr = np.array(arr, dtype=np.float32, order="C")  # a view into the read-only memory map
        return torch.from_numpy(arr)

    @property
    def config(self) -> dict[str, Any]:
        return self._config

    @cached_property
    def provenance(self) -> dict[str, Any] | None:  # type: ignore[override]
        return parse_json_object(self.kv(PROVENANCE_KEY))

    @property
    def gguf_kv(self) -> dict[str, Any]:
        return {k: self.kv(k) for k in CARRIED_KEYS if k in self.reader.fields}

    @cached_property
    def tokenizer_hash(self) -> str:
        """Every `tokenizer.*` field: the vocabulary, and also scores, special token ids,
        BOS/EOS flags, the space prefix and the chat template, all of which the converted
        tokenizer carries (two GGUFs differing only in their template must not share one)."""
        import hashlib

        h = hashlib.sha256()
        for key in sorted(k for k in self.reader.fields if k.startswith("tokenizer.")):
            f = self.reader.fields[key]
            h.update(key.encode() + b"\0")
            for i in f.data:
                h.update(bytes(f.parts[i]) + b"\0")
        return h.hexdigest()

    def tokenizer_dir(self) -> Path:
        """Convert the GGUF vocabulary with transformers once, then reuse the cached folder."""
        from cllm.paths import cache_dir

        if "tokenizer.ggml.tokens" not in self.reader.fields:
            raise InputError(f"{self.path} carries no tokenizer")
        # "gguf2": SentencePiece vocabularies are converted by cllm (see _spm_tokenizer)
        target = cache_dir() / "tokenizers" / ("gguf2-" + self.tokenizer_hash[:16])
        if not (target / "tokenizer_config.json").exists():
            import logging

            from transformers import AutoTokenizer

            logging.getLogger("transformers").setLevel(logging.ERROR)
            try:
                if self.kv("tokenizer.ggml.model") == "llama":
                    tok = self._spm_tokenizer()
                else:
                    tok = AutoTokenizer.from_pretrained(
                        str(self.path.parent), gguf_file=self.path.name
                    )
            except Exception as exc:  # noqa: BLE001 - converter errors are not typed
                raise InputError(
                    f"{self.path}: its tokenizer could not be converted ({exc})"
                ) from exc
            tmp = target.with_name(target.name + ".partial")
            tok.save_pretrained(str(tmp))
            if not target.exists():
                tmp.replace(target)
        return target

    def _spm_tokenizer(self) -> Any:
        from cllm.formats.gguf_vocab import spm_tokenizer

        def ids(key: str) -> int | None:
            value = self.kv(f"tokenizer.ggml.{key}_token_id")
            return None if value is None else int(value)

        tok = spm_tokenizer(
            [str(t) for t in self.kv("tokenizer.ggml.tokens", [])],
            [float(x) for x in self.kv("tokenizer.ggml.scores", [])],
            [int(x) for x in self.kv("tokenizer.ggml.token_type", [])],
            bool(self.kv("tokenizer.ggml.add_space_prefix", True)),
            {
                "bos_token": ids("bos"),
                "eos_token": ids("eos"),
                "unk_token": ids("unknown"),
                "pad_token": ids("padding"),
            },  # fmt: skip
        )
        template = self.kv("tokenizer.chat_template")
        if isinstance(template, str):
            tok.chat_template = template
        return tok

    def files(self) -> list[Path]:
        return [self.path]

    def close(self) -> None:
        self.reader = None  # type: ignore[assignment]


# -- writing ---------------------------------------------------------------------
@dataclass(frozen=True)
class PackedBlocks:
    """Integer codes already on a llama.cpp block grid (from GPTQ/AWQ), in transformers row order.

    The writer permutes rows for llama.cpp's layout and packs them, so the stored blocks
    are exactly these codes and scales rather than a re-rounding of their dequantized values.
    """

    codes: np.ndarray  # [rows, cols]
    scale: np.ndarray  # [rows, cols / 32]
    zero: np.ndarray  # [rows, cols / 32]


@dataclass(frozen=True)
class PackedRaw:
    """Blocks already in the type's byte layout, one row of blocks per weight row, in
    transformers row order (K-grid GPTQ output); the writer only reorders the rows."""

    raw: np.ndarray  # uint8 [rows, row bytes]


@dataclass(frozen=True)
class GGUFTensorPlan:
    hf_name: str
    shape: tuple[int, ...]
    produce: Callable[
        [], np.ndarray | PackedBlocks | PackedRaw
    ]  # float32 in transformers row order, or packed codes, or packed blocks
    qtype: str | None = None  # this tensor's type; None: the file's type (with the usual fallbacks)


def qtype_for(name: str, shape: tuple[int, ...], want: str) -> str:
    """The type a tensor gets: 1-D tensors stay F32 (as llama.cpp's converter does);
    a row length the block size does not divide falls back to F16."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if len(shape) < 2:
        return "F32"
    block = GGML_QUANT_SIZES[GGMLQuantizationType[want]][0]
    if shape[-1] % block:
        return "F16"
    return want


# Files of an HF tokenizer folder that can change the GGUF tokenizer keys.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
_TOKENIZER_CACHE_VERSION = 2  # bump when _build_tokenizer_fields changes its output


def _tokenizer_fields(
    tokenizer_dir: Path, vocab_size: int, carried: dict[str, Any]
) -> dict[str, Any]:
    """GGUF tokenizer keys for a tokenizer folder, cached by the content of its files.

    Building them means loading the tokenizer through transformers and re-parsing its
    vocabulary: about half a second for a 49k-token vocabulary, as long as the whole
    Q4_0 conversion of SmolLM2 otherwise takes. Every GGUF written from the same
    tokenizer gets the same keys, so they are built once and read back as JSON.
    """
    import hashlib

    from cllm.paths import cache_dir

    h = hashlib.sha256(f"v{_TOKENIZER_CACHE_VERSION}|{vocab_size}|".encode())
    h.update(json.dumps({k: v for k, v in carried.items() if k.startswith("tokenizer.")},
                        sort_keys=True, default=str).encode())  # fmt: skip
    for name in _TOKENIZER_FILES:
        f = Path(tokenizer_dir) / name
        if f.is_file():
            h.update(b"\0" + name.encode() + b"\0" + f.read_bytes())
    cached = cache_dir() / "gguf-tokenizers" / f"{h.hexdigest()[:32]}.json"
    try:
        fields = json.loads(cached.read_text(encoding="utf-8"))
        if isinstance(fields, dict) and "tokenizer.ggml.tokens" in fields:
            return fields
    except (OSError, ValueError):
        pass
    fields = _build_tokenizer_fields(tokenizer_dir, vocab_size, carried)
    try:  # a cache: no fsync, but never a half-written file under the final name
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(fields), encoding="utf-8")
        os.replace(tmp, cached)
    except OSError:
        pass
    return fields


def _build_tokenizer_fields(
    tokenizer_dir: Path, vocab_size: int, carried: dict[str, Any]
) -> dict[str, Any]:
    """GGUF tokenizer keys from an HF fast tokenizer: byte-level BPE or SentencePiece
    (see `gguf_vocab`)."""
    from cllm.formats.checkpoint import load_tokenizer
    from cllm.formats.gguf_vocab import bpe_pre_name, is_sentencepiece, vocab_fields

    tok = load_tokenizer(tokenizer_dir)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise UsageError("only fast (tokenizer.json) tokenizers can be written to GGUF")
    spec = json.loads(backend.to_str())
    if spec.get("model", {}).get("type") != "BPE":
        raise UsageError(
            f"tokenizer model {spec.get('model', {}).get('type')!r} cannot be written to GGUF",
            "Byte-level BPE and SentencePiece BPE tokenizers are supported",
        )
    fields = vocab_fields(tok, spec, vocab_size)
    if not is_sentencepiece(spec):
        fields["tokenizer.ggml.pre"] = carried.get("tokenizer.ggml.pre") or bpe_pre_name(tok, spec)
    for attr, key in (
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("unk_token_id", "tokenizer.ggml.unknown_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ):
        value = getattr(tok, attr, None)
        if isinstance(value, int):
            fields[key] = value
    template = carried.get("tokenizer.chat_template") or getattr(tok, "chat_template", None)
    if isinstance(template, str):
        fields["tokenizer.chat_template"] = template
    for key in (
        "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.add_eos_token",
        "tokenizer.ggml.add_space_prefix",
    ):
        if key in carried:
            fields[key] = bool(carried[key])
    return fields


def write_gguf(
    path: Path,
    config: dict[str, Any],
    tensors: Iterable[GGUFTensorPlan],
    gguf_type: str,
    tokenizer_dir: Path,
    carried: dict[str, Any],
    provenance: dict[str, Any],
    on_tensor: Callable[[str, str], None] | None = None,
) -> dict[str, int]:
    """Write a GGUF llama.cpp can load, streaming one tensor at a time.

    Returns how many tensors got each type, so callers can report fallbacks.
    """
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quant_shape_to_byte_shape, quantize

    from cllm.formats.gguf_pack import SPECS as GGUF_LEGACY
    from cllm.formats.gguf_pack import NonFiniteError, quantize_reference

    if gguf_type not in WRITABLE_TYPES + K_TYPES:
        raise UsageError(
            f"GGUF type {gguf_type} cannot be written by cllm's own GGUF writer",
            "Choose one of " + ", ".join(WRITABLE_TYPES),
        )
    spec = spec_for_config(config)
    plans = list(tensors)
    w = _fast_writer_class(GGUFWriter)(None, spec.gguf_arch)
    arch = spec.gguf_arch
    n_layers = int(config["num_hidden_layers"])
    w.add_name(str(carried.get("general.name") or config.get("_name_or_path") or "cllm model"))
    extra = spec.write_hparams(w, config)
    # llama.cpp's file type (informational); a K type names its usual _M mix
    ftype = {
        "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "BF16": 32,
        "Q2_K": 10, "Q3_K": 12, "Q4_K": 15, "Q5_K": 17, "Q6_K": 18,
    }[gguf_type]  # fmt: skip
    w.add_file_type(ftype)
    w.add_quantization_version(2)
    for key, value in _tokenizer_fields(tokenizer_dir, int(config["vocab_size"]), carried).items():
        _add_kv(w, key, value)
    w.add_string(PROVENANCE_KEY, json.dumps(provenance, sort_keys=True))

    counts: dict[str, int] = {}
    ordered: list[tuple[GGUFTensorPlan, str, str]] = []
    for p in plans:
        gname = spec.gguf_name(p.hf_name, n_layers)
        if gname is None:
            raise UsageError(f"tensor {p.hf_name} has no GGUF name for {arch}")
        if p.hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        qt = p.qtype or qtype_for(p.hf_name, p.shape, gguf_type)
        counts[qt] = counts.get(qt, 0) + 1
        ordered.append((p, gname, qt))
        qtype = GGMLQuantizationType[qt]
        nbytes = (
            int(np.prod(quant_shape_to_byte_shape(p.shape, qtype)))
            if qt not in ("F32", "F16")
            else int(np.prod(p.shape)) * (4 if qt == "F32" else 2)
        )
        w.add_tensor_info(gname, list(p.shape), np.dtype(np.float32), nbytes, raw_dtype=qtype)
    for gname, arr in extra.items():  # hyperparameters llama.cpp reads as tensors (F32)
        w.add_tensor_info(gname, list(arr.shape), np.dtype(np.float32), arr.nbytes,
                          raw_dtype=GGMLQuantizationType.F32)  # fmt: skip
    w.write_header_to_file(path=Path(path))
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for p, _gname, qt in ordered:
        produced = p.produce()
        if isinstance(produced, PackedRaw):
            w.write_tensor_data(
                np.ascontiguousarray(spec.rows_to_gguf(p.hf_name, produced.raw, config))
            )
            if on_tensor:
                on_tensor(p.hf_name, qt)
            continue
        if isinstance(produced, PackedBlocks):
            from cllm.formats.gguf_pack import pack_blocks

            rows = [
                spec.rows_to_gguf(p.hf_name, np.asarray(a), config)
                for a in (produced.codes, produced.scale, produced.zero)
            ]
            w.write_tensor_data(pack_blocks(qt, rows[0], rows[1], rows[2]))
            if on_tensor:
                on_tensor(p.hf_name, qt)
            continue
        arr = np.asarray(produced, dtype=np.float32)
        if tuple(arr.shape) != p.shape:
            raise RuntimeError(
                f"tensor {p.hf_name}: produced {list(arr.shape)}, planned {list(p.shape)}"
            )
        broken = InputError(
            f"tensor {p.hf_name} has non-finite values", "Refusing to write a broken model"
        )
        if qt not in GGUF_LEGACY and not np.isfinite(arr).all():
            raise broken
        arr = spec.to_gguf(p.hf_name, arr, config)
        if qt == "F32":
            data = np.ascontiguousarray(arr)
        elif qt == "F16":
            data = arr.astype(np.float16)
        elif qt in GGUF_LEGACY:
            try:  # checks finiteness from its block statistics
                data = quantize_reference(qt, np.ascontiguousarray(arr))
            except NonFiniteError:
                raise broken from None
        elif qt in K_TYPES:  # llama.cpp's reference K quantizer, byte for byte
            import torch

            from cllm.formats.kquants import quantize_rows

            if not np.isfinite(arr).all():
                raise broken
            data = quantize_rows(qt, torch.from_numpy(np.ascontiguousarray(arr)))
        else:
            data = quantize(np.ascontiguousarray(arr), GGMLQuantizationType[qt])
        w.write_tensor_data(data)
        if on_tensor:
            on_tensor(p.hf_name, qt)
    for arr in extra.values():
        w.write_tensor_data(np.ascontiguousarray(arr, dtype=np.float32))
    w.close()
    return counts


def _fast_writer_class(base: type) -> type:
    """gguf-py's writer with metadata arrays serialised in bulk.

    gguf-py packs an array element by element through a generic dispatcher: 150k calls and
    0.3 s for a 49k-token vocabulary with its merges. Long little-endian arrays of strings or
    numbers are packed here in one pass instead, into the same bytes.
    """
    from gguf import GGUFEndian, GGUFValueType

    numeric = {
        GGUFValueType.INT32: "<i4",
        GGUFValueType.UINT32: "<u4",
        GGUFValueType.FLOAT32: "<f4",
    }

    class FastWriter(base):  # type: ignore[valid-type,misc]
        def _pack_val(self, val: Any, vtype: Any, add_vtype: bool, sub_type: Any = None) -> bytes:
            if (
                vtype == GGUFValueType.ARRAY
                and isinstance(val, list)
                and len(val) > 64
                and self.endianess == GGUFEndian.LITTLE
            ):
                ltype = sub_type if sub_type is not None else GGUFValueType.get_type(val[0])
                head = (struct.pack("<I", vtype) if add_vtype else b"") + struct.pack(
                    "<IQ", ltype, len(val)
                )
                if ltype == GGUFValueType.STRING and all(isinstance(v, str) for v in val):
                    return head + _pack_strings(val)
                if ltype in numeric and all(type(v) in (int, float) for v in val):
                    return head + np.asarray(val, dtype=numeric[ltype]).tobytes()
            return bytes(super()._pack_val(val, vtype, add_vtype, sub_type))

    return FastWriter


def _pack_strings(values: list[str]) -> bytes:
    """GGUF string array items (u64 length + UTF-8 bytes each), laid out with numpy."""
    enc = [v.encode("utf-8") for v in values]
    lens = np.fromiter(map(len, enc), dtype=np.int64, count=len(enc))
    blob = np.frombuffer(b"".join(enc), dtype=np.uint8)
    out = np.empty(8 * len(enc) + blob.size, dtype=np.uint8)
    starts = np.concatenate(([0], np.cumsum(lens[:-1] + 8)))  # where each item's length goes
    out[(starts[:, None] + np.arange(8)).reshape(-1)] = lens.astype("<u8").view(np.uint8)
    if blob.size:
        out[np.arange(blob.size) + np.repeat(starts + 8 - np.cumsum(lens) + lens, lens)] = blob
    return out.tobytes()


def _add_kv(w: Any, key: str, value: Any) -> None:
    from gguf import GGUFValueType

    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, list) and value and isinstance(value[0], int):
        w.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)
    elif isinstance(value, list):
        w.add_array(key, value)
    else:
        raise TypeError(f"cannot write GGUF key {key} of type {type(value).__name__}")
