"""The three backends as task scorers: `score(groups)` and `generate(prompt, max_new, stop)`.

llama.cpp and onnxruntime run in a worker process (`cllm.core.worker`), as they do for
perplexity, so a native crash is one line; torch runs here. The session classes below are
what the worker builds; `open_scorer` returns an object with the same two methods in the
parent whichever backend it is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from cllm.core.tasks.scoring import Group, LlamaCppScorer, Score, greedy_tokens, onnx_score
from cllm.errors import UsageError


class LlamaCppTaskSession:
    """llama.cpp in the worker. No `logits_all`: the scorer asks for the rows it needs, so
    the context never holds `n_ctx x n_vocab` logits."""

    def __init__(self, gguf_path: str, n_ctx: int, threads: int | None = None) -> None:
        from cllm.core.eval.backends import open_llama

        threads = threads or min(os.cpu_count() or 1, 8)
        # the Llama object only loads the weights; the scorer makes its own context
        self.llm: Any = open_llama(gguf_path, 64, 64, threads, logits_all=False)
        self.scorer = LlamaCppScorer(self.llm, n_ctx, min(n_ctx, 512))

    def score(self, groups: list[Group]) -> list[list[Score]]:
        return self.scorer.score(groups)

    def generate(self, prompt: list[int], max_new: int, stop: list[int]) -> list[int]:
        n_past = [0]

        def next_logits(tokens: list[int], reset: bool) -> np.ndarray:
            if reset:
                n_past[0] = 0
            row = self.scorer.next_logits(tokens, n_past[0])
            n_past[0] += len(tokens)
            return row

        return greedy_tokens(next_logits, prompt, max_new, set(stop))

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            self.scorer.close()
            llm.close()
            self.llm = None


class OnnxTaskSession:
    def __init__(self, path: str, threads: int | None = None) -> None:
        from cllm.formats.onnx_io import open_decoder

        self.decoder = open_decoder(Path(path), threads or 0)

    def score(self, groups: list[Group]) -> list[list[Score]]:
        return onnx_score(self.decoder, groups)

    def generate(self, prompt: list[int], max_new: int, stop: list[int]) -> list[int]:
        cache = [self.decoder.empty_cache()]

        def next_logits(tokens: list[int], reset: bool) -> np.ndarray:
            if reset:
                cache[0] = self.decoder.empty_cache()
            logits, cache[0] = self.decoder.run(np.asarray([tokens]), cache[0])
            return np.asarray(logits[0, -1])

        return greedy_tokens(next_logits, prompt, max_new, set(stop))

    def close(self) -> None:
        self.decoder.close()


class TorchTaskSession:
    def __init__(self, ckpt: Any, threads: int | None = None, batch_size: int = 8) -> None:
        import torch

        from cllm.core.eval.backends import build_torch_model

        if threads:
            torch.set_num_threads(threads)
        self.model = build_torch_model(ckpt)
        self.batch_size = batch_size

    def score(self, groups: list[Group]) -> list[list[Score]]:
        from cllm.core.tasks.scoring import torch_score

        return torch_score(self.model, groups, self.batch_size)

    def generate(self, prompt: list[int], max_new: int, stop: list[int]) -> list[int]:
        import inspect

        import torch

        # transformers 5.2x renamed `past_key_values` to `cache` (the old name warns)
        key = (
            "cache"
            if "cache" in inspect.signature(self.model.forward).parameters
            else "past_key_values"
        )
        past: list[Any] = [None]

        def next_logits(tokens: list[int], reset: bool) -> np.ndarray:
            if reset:
                past[0] = None
            with torch.inference_mode():
                out = self.model(
                    input_ids=torch.as_tensor([tokens]), use_cache=True, **{key: past[0]}
                )
            past[0] = out.past_key_values
            return out.logits[0, -1].float().numpy()

        return greedy_tokens(next_logits, prompt, max_new, set(stop))

    def close(self) -> None:
        self.model = None


class _InWorker:
    """A task session in a worker process: the same methods, a crash as `NativeCrash`."""

    def __init__(self, runtime: str, path: Path, factory: str, *args: Any) -> None:
        from cllm.core.worker import Worker

        self.worker: Any = Worker(runtime, f"evaluating tasks on {path}", factory, str(path), *args)

    def score(self, groups: list[Group]) -> list[list[Score]]:
        return self.worker.call("score", groups)

    def generate(self, prompt: list[int], max_new: int, stop: list[int]) -> list[int]:
        return self.worker.call("generate", prompt, max_new, stop)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None


def open_scorer(
    model: Any, backend: str, max_length: int, threads: int | None, batch_size: int
) -> Any:
    """A scorer for `model` (a checkpoint, or an ONNX export) on `backend`."""
    if backend == "onnxruntime":
        return _InWorker(
            "onnxruntime", model.path, "cllm.core.tasks.sessions:OnnxTaskSession", threads
        )
    if backend == "llama.cpp":
        from cllm.core.eval.backends import check_finite, gguf_for_llamacpp

        check_finite(model)
        return _InWorker(
            "llama.cpp", gguf_for_llamacpp(model), "cllm.core.tasks.sessions:LlamaCppTaskSession",
            max_length, threads,
        )  # fmt: skip
    if backend == "torch":
        return TorchTaskSession(model, threads, batch_size)
    raise UsageError(f"unknown backend '{backend}'", "Choose torch, llama.cpp or onnxruntime")
