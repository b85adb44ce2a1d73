"""Helpers for native libraries (llama.cpp): quiet C output, calls made in a worker process."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any


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


def llama_quantize_file(src: str, dst: str, ftype: int, imatrix: str | None = None) -> int:
    """llama.cpp's quantizer on a GGUF file; run by `run_isolated`, so a crash in it is a
    one-line error rather than the end of cllm. Returns llama.cpp's return code.

    `imatrix`: an importance-matrix file (GGUF or .dat), handed over as llama.cpp's array of
    (name, values) entries ended by a null name (llama-cpp-python >= 0.3.20)."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 0
    keep: list[object] = []  # the buffers must outlive the call
    if imatrix is not None:
        import numpy as np

        from cllm.formats.imatrix import read_imatrix

        im = read_imatrix(imatrix)
        entry = llama_cpp.llama_model_imatrix_data
        array = (entry * (len(im.names) + 1))()  # zeroed: the last one ends the list
        for k, name in enumerate(im.names):
            values = np.ascontiguousarray(im.mean(name), dtype=np.float32)
            raw = name.encode()
            keep += [values, raw]
            array[k].name = raw
            array[k].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            array[k].size = values.size
        keep.append(array)
        params.imatrix = ctypes.cast(array, ctypes.POINTER(entry))
    with quiet_stderr():
        return int(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params))


def llama_accepts_imatrix() -> bool:
    """Whether this llama-cpp-python can pass an importance matrix (0.3.20 and later)."""
    import llama_cpp

    return hasattr(llama_cpp, "llama_model_imatrix_data")


def amx_retry_env(crash: Any) -> dict[str, str]:
    """The environment to run llama.cpp again in after `crash` (a NativeCrash): without its
    AMX / extra buffer types, where the CPU lists AMX and the probe let llama.cpp use them
    (a crash there is most likely that path failing after all; seen on an Intel Xeon whose
    probe passed). Anywhere else, or where the user forced the choice, the crash stands."""
    import logging

    from cllm.standalone.guard import ENV, decide

    d = decide()
    if not (d["amx_listed"] and d["extra_bufts"]) or d["setting"] != "auto":
        raise crash
    logging.getLogger("cllm").warning(
        "%s; running llama.cpp again without its AMX / extra CPU buffer types "
        "(set %s=off to go straight there on this machine)",
        crash.message,
        ENV,
    )
    return {**os.environ, ENV: "off"}
