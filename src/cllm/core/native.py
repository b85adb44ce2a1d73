"""Helpers for native libraries (llama.cpp): quiet C output, calls made in a worker process."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """llama.cpp prints to fd 2 from C; keep it off the user's terminal unless --debug."""
    if os.environ.get("CLLM_DEBUG"):
        yield
        return
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def llama_quantize_file(src: str, dst: str, ftype: int) -> int:
    """llama.cpp's quantizer on a GGUF file; run by `run_isolated`, so a crash in it is a
    one-line error rather than the end of cllm. Returns llama.cpp's return code."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 0
    with quiet_stderr():
        return int(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params))
