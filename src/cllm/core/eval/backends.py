"""Backends that turn a chunk of token ids into next-token logits.

`torch` runs transformers on the checkpoint's dequantized weights (the reference);
`llama.cpp` runs the GGUF itself through llama-cpp-python, kernels and all, which
is what a user deploying that file gets.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cllm.core.native import quiet_stderr
from cllm.errors import InputError, NativeCrash, RuntimeFailure, UsageError
from cllm.formats.checkpoint import Checkpoint

BACKENDS = ("torch", "llama.cpp", "onnxruntime")


class Backend(Protocol):
    name: str

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """float32 [len(tokens), vocab]: logits at every position."""
        ...

    def close(self) -> None: ...


def build_torch_model(
    ckpt: Checkpoint,
    allow_nonfinite: bool = False,
    *,
    config_dict: dict[str, Any] | None = None,
    tensors: Iterable[tuple[str, Any]] | None = None,
    attn_implementation: str | None = None,
) -> Any:
    """A transformers model holding the checkpoint's weights, read tensor by tensor.

    The module tree is made on the meta device (no random init, no double
    allocation), then each tensor is assigned as it is read. `config_dict` and `tensors`
    replace the checkpoint's own (a student made of some of its layers);
    `attn_implementation="eager"` is what returns attention maps.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    logging.getLogger("transformers").setLevel(logging.ERROR)
    cfg_dict = dict(ckpt.config if config_dict is None else config_dict)
    cfg_dict.pop("quantization_config", None)
    model_type = cfg_dict.pop("model_type", None)
    if not model_type:
        raise InputError(f"{ckpt.path}: config has no model_type")
    config = AutoConfig.for_model(
        model_type, **{k: v for k, v in cfg_dict.items() if k != "transformers_version"}
    )
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {}
    for name, tensor in ckpt.iter_tensors() if tensors is None else tensors:
        if tensor.is_floating_point():
            tensor = tensor.float()
            if not allow_nonfinite and not bool(torch.isfinite(tensor).all()):
                raise InputError(
                    f"tensor {name} holds non-finite values (NaN or inf)",
                    "The model is broken; pass --allow-nonfinite to evaluate it anyway",
                )
        state[name] = tensor
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise InputError(
            f"{ckpt.path}: weights do not match the architecture (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    # buffers computed in __init__ (rotary frequencies) were made on meta: rebuild them
    for mod_name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            if hasattr(module, "scalar_embed_scale"):  # Gemma's sqrt(hidden) embedding scale
                module.embed_scale = torch.tensor(float(module.scalar_embed_scale))
                continue
            parent_name, _, attr = mod_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, type(module)(config=config))
    leftovers = [
        n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta
    ]
    if leftovers:
        raise RuntimeFailure(f"could not materialise {leftovers[:3]}")
    model.eval()
    return model


class TorchBackend:
    name = "torch"

    def __init__(
        self, ckpt: Checkpoint, threads: int | None = None, allow_nonfinite: bool = False
    ) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.model = build_torch_model(ckpt, allow_nonfinite)
        self.threads = torch.get_num_threads()

    @classmethod
    def of(cls, model: Any) -> TorchBackend:
        """A model already in memory (a student being trained) as a backend."""
        import torch

        self = cls.__new__(cls)
        self.model = model
        self.threads = torch.get_num_threads()
        return self

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))[None]
            out = self.model(input_ids=ids.to(self.model.device), use_cache=False).logits[0]
        return out.float().cpu().numpy()

    def close(self) -> None:
        self.model = None


def open_llama(gguf_path: str, n_ctx: int, n_batch: int, threads: int, logits_all: bool) -> Any:
    """llama.cpp's `Llama` for evaluation (quiet, guarded for AMX), or one clear error."""
    try:
        import llama_cpp  # noqa: F401 - the error below is clearer than the guard's
    except ImportError as exc:
        raise UsageError(
            "the llama.cpp backend needs llama-cpp-python",
            "Install it: pip install llama-cpp-python",
        ) from exc
    from cllm.standalone.guard import load_llama

    try:
        with quiet_stderr():
            return load_llama(
                str(gguf_path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                logits_all=logits_all, n_threads=threads, n_threads_batch=threads, verbose=False,
            )  # fmt: skip
    except (ValueError, RuntimeError) as exc:
        raise RuntimeFailure(f"llama.cpp could not load {gguf_path}: {exc}") from exc


class LlamaCppSession:
    """llama.cpp in this process. Only ever built inside a worker process (`LlamaCppBackend`):
    a crash of llama.cpp's kernels would otherwise take cllm down with it."""

    name = "llama.cpp"

    def __init__(self, gguf_path: str, ctx: int, threads: int | None = None) -> None:
        self.threads = threads or min(os.cpu_count() or 1, 8)
        self.llm: Any = open_llama(gguf_path, ctx, ctx, self.threads, logits_all=True)

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        self.llm.reset()
        self.llm.eval([int(t) for t in tokens])
        # a view of llama-cpp-python's own buffer, valid until the next call: the worker
        # copies it straight into the shared file (no third copy of 100 MB a chunk)
        return self.llm.scores[: len(tokens)]

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()
            self.llm = None


class _Isolated:
    """A backend whose runtime runs in a worker process (see `cllm.core.worker`)."""

    name = ""

    def __init__(self, runtime: str, path: Path, factory: str, *args: Any) -> None:
        self.path = Path(path)
        self._spec = (runtime, factory, args)
        self.worker: Any = self._start()

    def _start(self, env: dict[str, str] | None = None) -> Any:
        from cllm.core.worker import Worker

        runtime, factory, args = self._spec
        subject = f"evaluating {self.path}"
        return Worker(runtime, subject, factory, str(self.path), *args, worker_env=env)

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        return self.worker.call("logits", np.asarray(tokens, dtype=np.int64))

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None


class LlamaCppBackend(_Isolated):
    """The GGUF run by llama.cpp in a worker process: a crash is one line, not a dead cllm."""

    name = "llama.cpp"

    def __init__(self, gguf_path: Path, ctx: int, threads: int | None = None) -> None:
        self._retried = False
        try:
            super().__init__(
                "llama.cpp", gguf_path, "cllm.core.eval.backends:LlamaCppSession", ctx, threads
            )
        except NativeCrash as exc:
            self.worker = self._without_extra_bufts(exc)

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        try:
            return super().logits(tokens)
        except NativeCrash as exc:
            self.worker = self._without_extra_bufts(exc)
            return super().logits(tokens)

    def _without_extra_bufts(self, crash: NativeCrash) -> Any:
        """Run once more without llama.cpp's AMX path (`amx_retry_env` says when)."""
        from cllm.core.native import amx_retry_env

        if self._retried:
            raise crash
        env = amx_retry_env(crash)
        self._retried = True
        return self._start(env)


def check_finite(ckpt: Checkpoint) -> None:
    """Refuse NaN/inf weights before a backend silently turns them into NaN perplexity."""
    import torch

    for name, tensor in ckpt.iter_tensors():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InputError(
                f"tensor {name} holds non-finite values (NaN or inf)",
                "The model is broken; pass --allow-nonfinite to evaluate it anyway",
            )


def gguf_for_llamacpp(ckpt: Checkpoint) -> Path:
    """llama.cpp needs a GGUF: a non-GGUF checkpoint is converted once to an F32 GGUF in the cache."""
    if ckpt.format == "gguf":
        return ckpt.path
    from cllm.formats.provenance import make_provenance
    from cllm.formats.save import save_gguf
    from cllm.paths import cache_dir

    target = cache_dir() / "gguf" / f"{ckpt.sha256[:16]}.F32.gguf"
    if not target.exists():
        prov = make_provenance(
            "export",
            {"to": "gguf", "gguf_type": "F32"},
            ckpt.sha256,
            ckpt.provenance,
            str(ckpt.path),
        )
        save_gguf(target, ckpt, "F32", prov)
    return target


class OnnxSession:
    """An ONNX export run by onnxruntime in this process (inside a worker, as above): logits
    of a whole chunk in one pass, empty cache."""

    name = "onnxruntime"

    def __init__(self, path: str, threads: int | None = None) -> None:
        from cllm.formats.onnx_io import open_decoder

        self.decoder = open_decoder(Path(path), threads or 0)

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        return self.decoder.logits(np.asarray(tokens, dtype=np.int64))[0]

    def close(self) -> None:
        self.decoder.close()


class OnnxBackend(_Isolated):
    name = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None) -> None:
        super().__init__("onnxruntime", path, "cllm.core.eval.backends:OnnxSession", threads)


def make_backend(
    ckpt: Checkpoint, name: str, ctx: int, threads: int | None = None, allow_nonfinite: bool = False
) -> Backend:
    if (getattr(ckpt, "format", "") == "onnx") != (name == "onnxruntime"):
        raise UsageError(
            "the onnxruntime backend runs ONNX exports, and only it does",
            "Use --backend onnxruntime for an ONNX folder, torch or llama.cpp otherwise",
        )
    if name == "onnxruntime":
        return OnnxBackend(ckpt.path, threads)
    if name == "torch":
        return TorchBackend(ckpt, threads, allow_nonfinite)
    if name == "llama.cpp":
        if not allow_nonfinite:
            check_finite(ckpt)
        return LlamaCppBackend(gguf_for_llamacpp(ckpt), ctx, threads)
    raise UsageError(f"unknown backend '{name}'", "Choose one of: " + ", ".join(BACKENDS))
