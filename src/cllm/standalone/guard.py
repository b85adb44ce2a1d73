"""Loading llama.cpp safely on the CPU at hand, and naming a native crash in words.

Why this exists: llama.cpp wheels built with native CPU flags compile in an AMX matrix
path, and on some Intel machines (seen in a VM whose CPU lists `amx_tile amx_int8
amx_bf16`) the AMX tiles are not actually usable: the first multiplication of any quantized
tensor dies with a general protection fault (SIGSEGV). Loading without llama.cpp's "extra
buffer types" (`llama_model_params.use_extra_bufts = False`) avoids that path and the same
files then run correctly. We cannot ask llama.cpp whether its AMX path works, so we find out
ourselves before loading: ask the kernel for tile-data permission and run a tiny AMX int8
multiply in a throwaway child process; only if that child returns the right numbers are the
extra buffer types kept. On CPUs that do not list AMX (AMD, older Intel, ARM) nothing is
probed and nothing changes, so their repacked fast paths stay on.

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
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ENV = "CLLM_AMX"
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
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"the AMX probe could not run ({exc})"
    if proc.returncode < 0:
        return False, f"the AMX probe died with {signal_text(proc.returncode)}"
    lines = (proc.stdout or proc.stderr).strip().splitlines()
    why = lines[-1] if lines else f"exit code {proc.returncode}"
    return proc.returncode == 0, why


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
        extra, why = probe_amx()
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
    print(json.dumps(decide()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
