"""`cllm bench --remote` against a real OpenSSH server on loopback, started here with a
throwaway host key and client key on a free port (no mock), and stopped afterwards."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_cli

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
pytestmark = pytest.mark.skipif(
    not Path(SSHD).exists() or shutil.which("ssh") is None,
    reason="needs OpenSSH's sshd and ssh (scripts/install.sh installs openssh-server as root)",
)
QUICK = ["--prompt", "8", "--gen", "4", "--repeat", "1", "--warmup", "0", "--threads", "2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("sshd")
    os.chmod(root, 0o700)
    for key in ("host", "client"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / key)], check=True
        )
    (root / "authorized_keys").write_text((root / "client.pub").read_text())
    os.chmod(root / "authorized_keys", 0o600)
    port = _free_port()
    config = root / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'host'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\nPidFile {root / 'sshd.pid'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        "StrictModes no\nPermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory sshd insists on
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE)
    deadline = time.time() + 10
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if proc.poll() is not None:
            pytest.fail(f"sshd did not start: {proc.stderr.read().decode() if proc.stderr else ''}")
        time.sleep(0.1)
    opts = ["--identity", str(root / "client"), "--ssh-option", "StrictHostKeyChecking=no",
            "--ssh-option", f"UserKnownHostsFile={root / 'known_hosts'}",
            "--ssh-option", "LogLevel=ERROR"]  # fmt: skip
    try:
        yield {"target": f"{getpass.getuser()}@127.0.0.1:{port}", "port": str(port), "opts": opts}  # type: ignore[misc]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def gguf(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("remote") / "tiny.Q8_0.gguf"
    run_cli(
        "export", str(tiny_model), "--to", "gguf", "--gguf-type", "Q8_0", "-o", str(out), check=True
    )
    return out


def test_remote_bench_returns_a_record_like_a_local_one(sshd: dict, gguf: Path) -> None:
    p = run_cli("bench", str(gguf), "--remote", sshd["target"], "--remote-python", sys.executable,
                *sshd["opts"], *QUICK, "--json")  # fmt: skip
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout)
    assert rec["schema"] == "cllm.bench/1" and rec["backend"] == "llama.cpp"
    assert rec["remote"] == sshd["target"].split("@")[1] or rec["remote"].endswith(sshd["port"])
    assert rec["model"] == str(gguf) and rec["tg_tps"]["median"] > 0
    assert rec["device"]["copy_bytes_per_s"] > 0 and rec["bandwidth"]["fraction_of_copy"] > 0
    assert "on " in p.stderr  # the progress line names the host
    # the temporary folder on the remote is gone
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob("cllm-bench.*"))


def test_remote_without_the_runtime_is_refused(sshd: dict, gguf: Path) -> None:
    p = run_cli("bench", str(gguf), "--remote", sshd["target"], "--remote-python", "/usr/bin/python3",
                *sshd["opts"], *QUICK)  # fmt: skip
    if p.returncode == 0:
        pytest.skip("the system python3 has llama-cpp-python here")
    assert p.returncode == 1 and p.stdout == ""
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("cllm bench: error:") and "has no llama.cpp runtime" in last


def test_unreachable_host_is_one_line_with_the_ssh_message(sshd: dict, gguf: Path) -> None:
    port = _free_port()  # nothing listens there
    p = run_cli("bench", str(gguf), "--remote", f"nobody@127.0.0.1:{port}", *sshd["opts"], *QUICK)
    assert p.returncode == 1 and p.stdout == "" and "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert "ssh to nobody@127.0.0.1 failed" in last and "Connection refused" in last


def test_bad_remote_spec(gguf: Path) -> None:
    p = run_cli("bench", str(gguf), "--remote", "a@b@c")
    assert p.returncode == 2 and "not user@host[:port]" in p.stderr
