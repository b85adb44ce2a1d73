"""Benchmarks on another machine over the system's ssh: copy, run, bring back the JSON.

The model and the standalone runner go to a fresh temporary folder on the remote (scp over
the same ssh options), the runner runs there with the remote's own Python and runtime, its
JSON record comes back on stdout, and the folder is removed whatever happened. Nothing but
ssh, scp and a Python with llama-cpp-python or onnxruntime is needed on the remote.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cllm.errors import NativeCrash, RuntimeFailure, UsageError

_TARGET = re.compile(
    r"^(?:(?P<user>[^@\s:]+)@)?(?P<host>[^@\s:]+|\[[0-9a-fA-F:]+\])(?::(?P<port>\d+))?$"
)
RUNTIME_MODULES = {"llama.cpp": "llama_cpp", "onnxruntime": "onnxruntime"}


@dataclass(frozen=True)
class Remote:
    host: str
    user: str | None = None
    port: int | None = None
    python: str = "python3"
    options: tuple[str, ...] = field(default=())  # extra `-o KEY=VALUE` for ssh and scp
    identity: str | None = None
    timeout: int = 15  # seconds to connect

    @classmethod
    def parse(cls, text: str, **kw: Any) -> Remote:
        m = _TARGET.match(text.strip())
        if not m:
            raise UsageError(f"--remote {text!r} is not user@host[:port]")
        port = int(m.group("port")) if m.group("port") else None
        return cls(host=m.group("host").strip("[]"), user=m.group("user"), port=port, **kw)

    @property
    def dest(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def _opts(self, port_flag: str) -> list[str]:
        opts = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.timeout}"]
        for o in self.options:
            opts += ["-o", o]
        if self.identity:
            opts += ["-i", self.identity]
        if self.port:
            opts += [port_flag, str(self.port)]
        return opts

    def ssh(self, command: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """Run `command` (a shell line) on the remote; an ssh-level failure raises."""
        proc = _run(["ssh", *self._opts("-p"), self.dest, command], timeout, self.dest)
        if proc.returncode == 255:  # ssh's own failure: connection, authentication, host key
            raise RuntimeFailure(f"ssh to {self.dest} failed: {_last(proc.stderr)}",
                                 "Check the host, port and key (ssh must log in without a prompt)")  # fmt: skip
        return proc

    def copy(self, paths: list[Path], remote_dir: str, timeout: float = 3600) -> None:
        target = f"{self.dest}:{remote_dir}/"
        if ":" in self.host:
            target = f"{self.user + '@' if self.user else ''}[{self.host}]:{remote_dir}/"
        cmd = ["scp", "-q", "-r", *self._opts("-P"), *(str(p) for p in paths), target]
        proc = _run(cmd, timeout, self.dest)
        if proc.returncode != 0:
            raise RuntimeFailure(f"copying to {self.dest} failed: {_last(proc.stderr)}")


def _run(cmd: list[str], timeout: float, dest: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL)  # fmt: skip
    except FileNotFoundError as exc:
        raise UsageError(f"{cmd[0]} is not installed", "Install the OpenSSH client") from exc
    except subprocess.TimeoutExpired as exc:
        raise RuntimeFailure(f"{cmd[0]} to {dest} took over {timeout:.0f} s") from exc


def _last(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


def find_runtime(remote: Remote, backend: str) -> str:
    """The runtime the remote has for `backend` (auto: llama.cpp for GGUF, onnxruntime for
    ONNX, decided by the caller); a remote without it is refused before copying anything."""
    module = RUNTIME_MODULES[backend]
    probe = f"{shlex.quote(remote.python)} -c " + shlex.quote(
        f"import {module}, numpy; print(getattr({module}, '__version__', '?'))"
    )
    proc = remote.ssh(probe, timeout=120)
    if proc.returncode != 0:
        have = remote.ssh(
            "command -v llama-bench llama-cli 2>/dev/null | tr '\\n' ' '", timeout=60
        ).stdout.strip()
        hint = (
            f"found {have} but cllm runs the Python bindings; pip install llama-cpp-python there"
            if have
            else f"pip install {'llama-cpp-python' if backend == 'llama.cpp' else 'onnxruntime'} numpy"
            f" for {remote.python} there, or point --remote-python at a Python that has it"
        )
        raise RuntimeFailure(
            f"{remote.dest} has no {backend} runtime for {remote.python} ({_last(proc.stderr)})",
            hint,
        )
    return proc.stdout.strip()


def run_remote(remote: Remote, model: Path, backend: str, cfg: Any) -> dict[str, Any]:
    """Copy `model` and the runner to a temporary folder there, run it, return its record."""
    from cllm.standalone import shipped_files

    if backend not in RUNTIME_MODULES:
        raise UsageError(f"--remote runs llama.cpp or onnxruntime models, not {backend}",
                         "Export the model to GGUF or ONNX first")  # fmt: skip
    find_runtime(remote, backend)
    made = remote.ssh('mktemp -d "${TMPDIR:-/tmp}/cllm-bench.XXXXXX"', timeout=60)
    folder = made.stdout.strip()
    if made.returncode != 0 or not folder.startswith("/"):
        raise RuntimeFailure(f"cannot make a folder on {remote.dest}: {_last(made.stderr)}")
    try:
        remote.copy([Path(model), *shipped_files()], folder)
        cmd = (
            f"cd {shlex.quote(folder)} && {shlex.quote(remote.python)} runner.py "
            f"{shlex.quote(Path(model).name)} --backend {backend} --threads {cfg.threads} "
            f"--prompt {cfg.prompt} --gen {cfg.gen} --repeat {cfg.repeat} --warmup {cfg.warmup}"
        )
        proc = remote.ssh(cmd, timeout=6 * 3600)
        if 128 < proc.returncode < 160:  # the remote shell's code for a runner killed by a signal
            raise NativeCrash(
                backend,
                f"benchmarking {model} on {remote.dest}",
                128 - proc.returncode,
                local=False,
            )
        if proc.returncode != 0:
            raise RuntimeFailure(f"benchmark on {remote.dest} failed: {_last(proc.stderr)}")
        try:
            record = json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError) as exc:
            raise RuntimeFailure(f"{remote.dest} returned no benchmark record") from exc
    finally:
        with contextlib.suppress(RuntimeFailure):
            remote.ssh(f"rm -rf {shlex.quote(folder)}", timeout=60)
    record["remote"] = remote.dest + (f":{remote.port}" if remote.port else "")
    record["model"] = str(model)
    return record
