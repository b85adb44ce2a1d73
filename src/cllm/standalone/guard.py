"""Loading llama.cpp safely on the CPU at hand, and naming a native crash in words.

Why this exists: llama.cpp wheels built with native CPU flags compile in an AMX matrix
path, and on some Intel machines (seen in a VM whose CPU lists `amx_tile amx_int8
amx_bf16`) the AMX tiles are not actually usable: the first multiplication of any quantized
tensor dies with a general protection fault (SIGSEGV). Loading without llama.cpp's "extra
buffer types" (`llama_model_params.use_extra_bufts = False`) avoids that path and the same
files then run correctly. We cannot ask llama.cpp whether its AMX path works, so we find out
ourselves before loading, in throwaway child processes: first ask the kernel for tile-data
permission and run a tiny AMX int8 multiply; then, because a second Intel Xeon passed that
test yet llama.cpp's AMX kernels still died there on every batch of two or more tokens, let
llama.cpp itself decode a few tokens of a tiny Q8_0 model written on the spot. Only if both
children finish with the right answers are the extra buffer types kept. On CPUs that do not
list AMX (AMD, older Intel, ARM) nothing is probed and nothing changes, so their repacked
fast paths stay on. The answer is kept in `amx-probe.json` in cllm's cache folder (valid
for this CPU, kernel, Python and llama_cpp install) and handed to child processes through
`CLLM_AMX_PROBED`, so that neither later commands nor each worker probe again.

`CLLM_AMX=on|off|auto` forces the decision either way (`off` loads without the extra
buffer types, which also turns off llama.cpp's repacked CPU layouts).

Standalone on purpose, like `runner.py`: standard library only (plus llama_cpp where it
loads a model), because edge bundles ship it beside the runner.

    python guard.py            # prints the decision as JSON
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ENV = "CLLM_AMX"
PROBED_ENV = "CLLM_AMX_PROBED"  # "1 <why>" / "0 <why>": a parent's probe result, reused
ON = ("1", "on", "true", "yes")
OFF = ("0", "off", "false", "no")

# x86-64 machine code for one AMX int8 tile multiply (assembled with GNU as 2.40):
#   ldtilecfg [rdi]; mov rax, 64; tileloadd tmm1, [rsi+rax]; tileloadd tmm2, [rdx+rax]
#   tilezero tmm0; tdpbssd tmm0, tmm1, tmm2; tilestored [rcx+rax], tmm0; tilerelease; ret
_AMX_CODE = bytes.fromhex(
    "c4e2784907" "48c7c040000000" "c4e27b4b0c06" "c4e27b4b1402"
    "c4e27b49c0" "c4e26b5ec1" "c4e27a4b0401" "c4e27849c0" "c3"
)  # fmt: skip
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18
_SYS_ARCH_PRCTL = 158  # x86-64

_decision: dict[str, Any] | None = None


def amx_listed(cpuinfo: str | None = None) -> bool:
    """Whether the CPU advertises AMX tiles (what makes llama.cpp pick its AMX path)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags") and ":" in line:
            return "amx_tile" in line.split(":", 1)[1].split()
    return False


def signal_text(returncode: int) -> str:
    """`signal 11 (SIGSEGV)` for a child killed by a signal (a negative return code)."""
    num = -returncode
    try:
        name = signal.Signals(num).name
    except ValueError:
        return f"signal {num}"
    return f"signal {num} ({name})"


def _probe_in_this_process() -> tuple[bool, str]:
    """Run the AMX multiply here (only ever inside a throwaway child: it may kill us)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) != 0:
        return False, f"the kernel refused AMX tile data (errno {ctypes.get_errno()})"
    try:
        page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, ValueError) as exc:
        return False, f"no executable memory for the probe ({exc})"
    page.write(_AMX_CODE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
    fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)(
        addr
    )
    cfg = (ctypes.c_uint8 * 64)()
    cfg[0] = 1  # palette 1
    for t in range(3):  # tmm0..2: 16 rows of 64 bytes
        cfg[16 + 2 * t] = 64
        cfg[48 + t] = 16
    a = [((i * 7 + 3) % 31) - 15 for i in range(16 * 64)]  # int8, 16 x 64
    b = [((i * 5 + 1) % 29) - 14 for i in range(16 * 64)]  # int8, 16 rows x (16 cols x 4)
    buf_a = (ctypes.c_int8 * len(a))(*a)
    buf_b = (ctypes.c_int8 * len(b))(*b)
    buf_c = (ctypes.c_int32 * 256)()
    fn(ctypes.addressof(cfg), ctypes.addressof(buf_a), ctypes.addressof(buf_b),
       ctypes.addressof(buf_c))  # fmt: skip
    for m in range(16):
        for n in range(16):
            want = sum(
                a[m * 64 + 4 * k + i] * b[k * 64 + 4 * n + i] for k in range(16) for i in range(4)
            )
            if buf_c[m * 16 + n] != want:
                return False, f"AMX returned wrong numbers ({buf_c[m * 16 + n]} != {want})"
    return True, "the AMX probe multiplied correctly"


def probe_amx(timeout: float = 30.0, argv: list[str] | None = None) -> tuple[bool, str]:
    """(usable, why): the tile multiply run in a child, so a fault there costs only the child.
    `argv` replaces the child's command (tests use it to stand in for a faulting CPU)."""
    cmd = argv or [sys.executable, "-I", "-S", str(Path(__file__).resolve()), "--amx-probe"]
    return _run_probe(cmd, timeout, "the AMX probe")


def _run_probe(cmd: list[str], timeout: float, what: str) -> tuple[bool, str]:
    """(passed, why) of a probe child: its last line, or how it died."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"{what} could not run ({exc})"
    if proc.returncode < 0:
        return False, f"{what} died with {signal_text(proc.returncode)}"
    lines = (proc.stdout or proc.stderr).strip().splitlines()
    return proc.returncode == 0, lines[-1] if lines else f"exit code {proc.returncode}"


def _gguf_str(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def write_probe_gguf(path: str, dim: int = 256, vocab: int = 64) -> None:
    """A one-layer Llama with Q8_0 weights (a type llama.cpp's AMX kernels take) and no
    tokenizer: just enough for llama.cpp to run its matrix kernels. Written with the standard
    library because this file ships to boards without the gguf package."""
    kvs = [("general.architecture", 8, "llama"), ("llama.context_length", 4, 64),
           ("llama.embedding_length", 4, dim), ("llama.block_count", 4, 1),
           ("llama.feed_forward_length", 4, dim), ("llama.attention.head_count", 4, 4),
           ("llama.attention.head_count_kv", 4, 4),
           ("llama.attention.layer_norm_rms_epsilon", 6, 1e-5), ("llama.vocab_size", 4, vocab),
           ("tokenizer.ggml.model", 8, "none")]  # fmt: skip
    f32, q8_0 = 0, 8
    tensors = [("token_embd.weight", (dim, vocab), f32), ("output_norm.weight", (dim,), f32),
               ("output.weight", (dim, vocab), q8_0), ("blk.0.attn_norm.weight", (dim,), f32),
               ("blk.0.ffn_norm.weight", (dim,), f32)]  # fmt: skip
    for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
        tensors.append((f"blk.0.{name}.weight", (dim, dim), q8_0))
    rng = random.Random(0)
    blobs = []
    for name, shape, kind in tensors:
        count = shape[0] * (shape[1] if len(shape) > 1 else 1)
        if name.endswith("norm.weight"):
            blobs.append(struct.pack(f"<{count}f", *([1.0] * count)))
        elif kind == f32:
            blobs.append(struct.pack(f"<{count}f", *(rng.uniform(-0.5, 0.5) for _ in range(count))))
        else:  # Q8_0 blocks: an fp16 scale, then 32 int8 values
            block = bytearray()
            for _ in range(count // 32):
                block += struct.pack("<e", 0.004) + bytes(rng.randrange(256) for _ in range(32))
            blobs.append(bytes(block))
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs))
    pack = {4: lambda v: struct.pack("<I", v), 6: lambda v: struct.pack("<f", v), 8: _gguf_str}
    for key, kind, value in kvs:
        head += _gguf_str(key) + struct.pack("<I", kind) + pack[kind](value)
    offset = 0
    for (name, shape, kind), blob in zip(tensors, blobs):  # noqa: B905 - boards may run < 3.10
        head += _gguf_str(name) + struct.pack("<I", len(shape))
        head += b"".join(struct.pack("<Q", d) for d in shape) + struct.pack("<IQ", kind, offset)
        offset += len(blob) + (-len(blob)) % 32
    with open(path, "wb") as out:
        out.write(head + b"\0" * ((-len(head)) % 32))
        for blob in blobs:
            out.write(blob + b"\0" * ((-len(blob)) % 32))


@contextlib.contextmanager
def quiet_native() -> Iterator[None]:
    """llama.cpp logs to the C-level stderr; the probe's child keeps that to itself."""
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def _llama_probe_in_this_process(folder: str) -> tuple[bool, str]:
    """Decode a few tokens with llama.cpp's extra buffer types (only inside a throwaway child)."""
    import math

    import llama_cpp

    path = os.path.join(folder, "amx-probe.gguf")
    write_probe_gguf(path)
    with quiet_native():
        llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_batch=64, n_ubatch=64,
                              logits_all=True, verbose=False, n_threads=2)  # fmt: skip
        llm.eval(list(range(1, 9)))  # a batch of several tokens: where the AMX kernels run
        scores = [float(x) for x in llm.scores[7][:8]]
        llm.close()
    if not all(math.isfinite(x) for x in scores):
        return False, "llama.cpp's AMX path returned non-finite logits"
    return True, "the AMX probe multiplied correctly and llama.cpp decoded with its AMX path"


def probe_llama(timeout: float = 60.0, argv: list[str] | None = None) -> tuple[bool, str]:
    """(usable, why): llama.cpp decoding with its AMX path, in a child. Without llama_cpp
    installed there is nothing to protect, so the tile probe's answer stands."""
    import importlib.util
    import tempfile

    if argv is None and importlib.util.find_spec("llama_cpp") is None:
        return True, "the AMX probe multiplied correctly (llama_cpp is not installed)"
    with tempfile.TemporaryDirectory(prefix="cllm-amx-") as folder:
        cmd = argv or [sys.executable, "-I", str(Path(__file__).resolve()), "--llama-probe", folder]
        return _run_probe(cmd, timeout, "llama.cpp's AMX path")


def _probe_cache() -> tuple[Path, str]:
    """Where the probes' answer is kept between commands, and the key it is valid for: this
    CPU (model and flags), this kernel, this Python and this llama_cpp install."""
    import hashlib
    import importlib.util
    import platform

    root = os.environ.get("CLLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cllm"
    )
    try:
        cpu = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines()
               if ln.startswith(("model name", "flags"))][:2]  # fmt: skip
    except OSError:
        cpu = []
    spec = importlib.util.find_spec("llama_cpp")
    origin = spec.origin if spec and spec.origin else ""
    stamp = os.stat(origin).st_mtime_ns if origin else 0
    parts = [*cpu, platform.release(), sys.version, origin, str(stamp)]
    return Path(root) / "amx-probe.json", hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _probed() -> tuple[bool, str]:
    """Both probes (about a second), or the answer a parent process or an earlier command on
    this machine already found."""
    inherited = os.environ.get(PROBED_ENV, "")
    if inherited[:2] in ("1 ", "0 "):
        return inherited[0] == "1", inherited[2:]
    path, key = _probe_cache()
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            extra, why = bool(cached["extra_bufts"]), str(cached["why"])
            os.environ[PROBED_ENV] = f"{int(extra)} {why}"
            return extra, why
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    extra, why = probe_amx()
    if extra:
        extra, why = probe_llama()
    os.environ[PROBED_ENV] = f"{int(extra)} {why}"
    try:  # atomic, and a cache that cannot be written only costs the next command a probe
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "extra_bufts": extra, "why": why}))
        os.replace(tmp, path)
    except OSError:
        pass
    return extra, why


def decide(force: str | None = None) -> dict[str, Any]:
    """Whether llama.cpp may use its extra CPU buffer types (AMX, repacked weights) here.

    Returns `{"amx_listed", "extra_bufts", "why"}`, decided once per process (the probe
    costs one short child process, and only on CPUs that list AMX).
    """
    global _decision
    setting = (os.environ.get(ENV, "") if force is None else force).strip().lower()
    if force is None and _decision is not None and _decision.get("setting") == setting:
        return _decision
    listed = amx_listed()
    if setting in ON:
        extra, why = True, f"{ENV}={setting}"
    elif setting in OFF:
        extra, why = False, f"{ENV}={setting}"
    elif not listed:
        extra, why = True, "the CPU lists no AMX"
    else:
        extra, why = _probed()
        if not extra:
            why = f"AMX is listed but not usable: {why}"
    result = {"amx_listed": listed, "extra_bufts": extra, "why": why, "setting": setting or "auto"}
    if force is None:
        _decision = result
    return result


@contextlib.contextmanager
def _default_params_without_extra_bufts(llama_cpp: Any) -> Iterator[None]:
    """llama_cpp.Llama builds its model params from `llama_model_default_params()` and offers
    no argument for `use_extra_bufts`; hand it defaults with the field off while it loads."""
    module = getattr(llama_cpp, "llama_cpp", llama_cpp)
    original = module.llama_model_default_params

    def patched() -> Any:
        params = original()
        if hasattr(params, "use_extra_bufts"):
            params.use_extra_bufts = False
        return params

    module.llama_model_default_params = patched
    try:
        yield
    finally:
        module.llama_model_default_params = original


def load_llama(model_path: str, **kwargs: Any) -> Any:
    """`llama_cpp.Llama(model_path, **kwargs)`, with the extra buffer types off where `decide`
    says they are unsafe. Every place cllm loads a GGUF into llama.cpp comes through here."""
    import llama_cpp

    if decide()["extra_bufts"]:
        return llama_cpp.Llama(model_path=model_path, **kwargs)
    with _default_params_without_extra_bufts(llama_cpp):
        return llama_cpp.Llama(model_path=model_path, **kwargs)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--amx-probe"]:
        ok, why = _probe_in_this_process()
        print(why, flush=True)
        return 0 if ok else 3
    if len(args) == 2 and args[0] == "--llama-probe":
        ok, why = _llama_probe_in_this_process(args[1])
        print(why, flush=True)
        return 0 if ok else 3
    print(json.dumps(decide()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
