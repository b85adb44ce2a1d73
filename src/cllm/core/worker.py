"""Native runtimes (llama.cpp, onnxruntime) run in a child process, so that their crash is
one line from cllm instead of the end of cllm.

A segmentation fault inside a C library cannot be caught in the process it happens in: the
kernel ends the whole interpreter, with no message from cllm and a partial run. So the
object that drives the runtime lives in a worker process, and the parent talks to it over a
pipe: method calls and small results as pickles, large arrays (a chunk's logits are
`ctx x vocab` floats, 100 MB for SmolLM2 at ctx 512) through a file in `/dev/shm` that both
sides keep mapped, which costs two memory copies (about 40 ms each for 100 MB here) instead
of a pipe transfer that took 300-500 ms per chunk.

When the worker dies the parent raises `NativeCrash("llama.cpp crashed (signal 11
(SIGSEGV)) while evaluating X", hint)`: one line and exit code 1 at the CLI.

The worker imports only what the object it serves needs (no torch for llama.cpp or
onnxruntime), so starting it costs a fraction of a second.

Test hook: with `CLLM_TEST_CRASH=<runtime>` in its environment, a worker for that runtime
kills itself with SIGSEGV on its first call, as a crashing native kernel would
(`<runtime>:extra-bufts`: only where llama.cpp would use its extra buffer types).
"""

from __future__ import annotations

import importlib
import os
import pickle
import signal
import subprocess
import sys
import tempfile
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from cllm import errors
from cllm.errors import CllmError, NativeCrash, RuntimeFailure

_BIG = 1 << 20  # arrays of this many bytes or more go through the shared file
TEST_CRASH_ENV = "CLLM_TEST_CRASH"


def _shared_dir() -> str:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else tempfile.gettempdir()


def _debug() -> bool:
    return os.environ.get("CLLM_DEBUG", "") not in ("", "0")


class Worker:
    """An object built by `factory(*args, **kwargs)` in a child process; `call` runs its methods.

    `runtime` and `subject` name what crashed and what it was doing, for the error message.
    """

    def __init__(
        self,
        runtime: str,
        subject: str,
        factory: str,
        *args: Any,
        worker_env: dict[str, str] | None = None,
        **kwargs: Any,
    ):
        self.runtime = runtime
        self.subject = subject
        parent_r, child_w = os.pipe()
        child_r, parent_w = os.pipe()
        fd, shared = tempfile.mkstemp(prefix="cllm-worker-", suffix=".bin", dir=_shared_dir())
        os.close(fd)
        self._shared = Path(shared)
        self._map: np.memmap | None = None  # the shared file, mapped once it holds an array
        self._log = tempfile.TemporaryFile(prefix="cllm-worker-", suffix=".log")  # noqa: SIM115 - lives as long as the worker
        cmd = [sys.executable, "-m", "cllm.core.worker", str(child_r), str(child_w), shared]
        try:
            self.proc = subprocess.Popen(
                cmd,
                pass_fds=(child_r, child_w),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=None if _debug() else self._log,
                env=worker_env,
            )
        except OSError:
            self._shared.unlink(missing_ok=True)
            raise
        finally:
            os.close(child_r)
            os.close(child_w)
        self._recv = Connection(parent_r, writable=False)
        self._send = Connection(parent_w, readable=False)
        try:
            self._request(("init", factory, args, kwargs, runtime))
        except BaseException:
            self.close()
            raise

    def call(self, method: str, *args: Any) -> Any:
        return self._request(("call", method, args))

    def _request(self, message: tuple[Any, ...]) -> Any:
        try:
            self._send.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
            reply = pickle.loads(self._recv.recv_bytes())
        except (EOFError, BrokenPipeError, ConnectionResetError, OSError):
            raise self._died() from None
        kind = reply[0]
        if kind == "ok":
            return reply[1]
        if kind == "array":
            _, shape, dtype, nbytes = reply
            if self._map is None or self._map.size < nbytes:  # the worker grew the file
                self._map = np.memmap(self._shared, dtype=np.uint8, mode="r")
            return self._map[:nbytes].view(np.dtype(dtype)).reshape(shape).copy()
        _, cls_name, message, hint = reply
        found = getattr(errors, str(cls_name), None)
        cls: type[CllmError] = RuntimeFailure
        if isinstance(found, type) and issubclass(found, CllmError) and found is not NativeCrash:
            cls = found
        raise cls(str(message), str(hint))

    def _died(self) -> NativeCrash:
        try:
            rc = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        err = NativeCrash(self.runtime, self.subject, rc, self._last_words())
        self._cleanup()
        return err

    def _last_words(self) -> str:
        """The runtime's last line on stderr, when it is an assertion or error message."""
        try:
            self._log.seek(0)
            text = self._log.read().decode(errors="replace")
        except (OSError, ValueError):
            return ""
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        keys = ("assert", "error", "abort", "fault")
        return next((ln for ln in reversed(lines) if any(k in ln.lower() for k in keys)), "")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self._send.send_bytes(pickle.dumps(("close",)))
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        for conn in (self._send, self._recv):
            conn.close()
        self._map = None
        self._shared.unlink(missing_ok=True)
        self._log.close()

    def __del__(self) -> None:  # a worker left open must not outlive its parent object
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
        shared = getattr(self, "_shared", None)
        if shared is not None:
            shared.unlink(missing_ok=True)


class _Result:
    """What `run_isolated` builds in the worker: the function's value, computed at init."""

    def __init__(self, func: str, *args: Any) -> None:
        module, _, name = func.partition(":")
        self._value = getattr(importlib.import_module(module), name)(*args)

    def value(self) -> Any:
        return self._value


def run_isolated(runtime: str, subject: str, func: str, *args: Any) -> Any:
    """`func(*args)` (`func` as "module:name") in a worker process: its value, its CllmError
    as raised, or its crash as NativeCrash."""
    worker = Worker(runtime, subject, "cllm.core.worker:_Result", func, *args)
    try:
        return worker.call("value")
    finally:
        worker.close()


def _test_crash(runtime: str) -> bool:
    """The test hook: `CLLM_TEST_CRASH=<runtime>` always, `<runtime>:extra-bufts` only where
    llama.cpp would load with its extra buffer types (a broken AMX path's signature)."""
    want = os.environ.get(TEST_CRASH_ENV, "")
    if want == runtime:
        return True
    if want == f"{runtime}:extra-bufts":
        from cllm.standalone.guard import decide

        return bool(decide()["extra_bufts"])
    return False


class _SharedOut:
    """The worker's side of the shared file: mapped once, grown when an array needs more."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.map: np.memmap | None = None

    def put(self, array: np.ndarray) -> tuple[Any, ...]:
        if self.map is None or self.map.size < array.nbytes:
            self.map = None
            os.truncate(self.path, array.nbytes)
            self.map = np.memmap(self.path, dtype=np.uint8, mode="r+")
        dest = self.map[: array.nbytes].view(array.dtype).reshape(array.shape)
        np.copyto(dest, array)
        return ("array", array.shape, array.dtype.str, array.nbytes)


def _serve(recv: Connection, send: Connection, shared: str) -> None:
    obj: Any = None
    out = _SharedOut(shared)
    crash_on_call = False
    while True:
        try:
            message = pickle.loads(recv.recv_bytes())
        except EOFError:
            return
        if message[0] == "close":
            if obj is not None and hasattr(obj, "close"):
                obj.close()
            return
        try:
            if message[0] == "init":
                _, factory, args, kwargs, runtime = message
                module, _, name = factory.partition(":")
                obj = getattr(importlib.import_module(module), name)(*args, **kwargs)
                crash_on_call = _test_crash(runtime)
                result: Any = None
            else:
                if crash_on_call:
                    os.kill(os.getpid(), signal.SIGSEGV)
                _, method, args = message
                result = getattr(obj, method)(*args)
            if isinstance(result, np.ndarray) and result.nbytes >= _BIG:
                reply: tuple[Any, ...] = out.put(result)
            else:
                reply = ("ok", result)
        except CllmError as exc:
            reply = ("err", type(exc).__name__, exc.message, exc.hint)
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
            text = f"{type(exc).__name__}: {exc}".splitlines()[0]
            reply = ("err", "RuntimeFailure", text, "")
        send.send_bytes(pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))


def main() -> int:
    # Ctrl-C reaches the whole process group: the parent decides, and closes or kills us
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    recv = Connection(int(sys.argv[1]), writable=False)
    send = Connection(int(sys.argv[2]), readable=False)
    try:
        _serve(recv, send, sys.argv[3])
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
