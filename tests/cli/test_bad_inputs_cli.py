"""Bad inputs through the real CLI: one stderr line, exit code 2, no traceback, no output left."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cllm.testing.badfiles import (
    EXPECT,
    MALFORMED,
    NONFINITE,
    Builder,
    Sources,
)
from cllm.testing.tiny import tiny_text


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("CLLM_DEBUG", None)
    env.update(
        CLLM_CACHE=str(tmp_path_factory.mktemp("cllm-cache")),
        NO_COLOR="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


@pytest.fixture(scope="module")
def cases_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bad-inputs-cli")


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("eval-text") / "small.txt"
    path.write_text(tiny_text(400))
    return path


def cllm(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cllm", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], cmd: str, expect: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.endswith("\n") and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"cllm {cmd}: error: "), proc.stderr
    assert expect in proc.stderr


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _build(fn: Builder, src: Sources, dest: Path) -> tuple[Path, list[str]]:
    path = fn(src, dest)
    return path, _listing(dest)


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_info_refuses(
    bad_sources: Sources, cases_root: Path, cli_env: dict[str, str], name: str
) -> None:
    path, before = _build(MALFORMED[name], bad_sources, cases_root / f"info-{name}")
    proc = cllm(cli_env, "info", str(path))
    assert_one_line_error(proc, "info", EXPECT[name])
    assert _listing(cases_root / f"info-{name}") == before


def _assert_export_refused(
    env: dict[str, str], path: Path, tmp_path: Path, expect: str, *extra: str
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "x.gguf"
    proc = cllm(env, "export", str(path), "--to", "gguf", *extra, "-o", str(out))
    assert_one_line_error(proc, "export", expect)
    assert not out.exists()
    assert list(out_dir.iterdir()) == [], "temporary files were left behind"


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_export_refuses(
    bad_sources: Sources, cases_root: Path, cli_env: dict[str, str], tmp_path: Path, name: str
) -> None:
    path, before = _build(MALFORMED[name], bad_sources, cases_root / f"export-{name}")
    _assert_export_refused(cli_env, path, tmp_path, EXPECT[name])
    assert _listing(cases_root / f"export-{name}") == before


@pytest.mark.slow  # two full exports per case (about 12 s each); CI runs it with the slow tests
@pytest.mark.parametrize("name", sorted(NONFINITE))
def test_export_refuses_nonfinite(
    bad_sources: Sources, cases_root: Path, cli_env: dict[str, str], tmp_path: Path, name: str
) -> None:
    # the writer finds the NaN mid-file: the temporary file must be removed
    path = NONFINITE[name](bad_sources, cases_root / f"export-{name}")
    _assert_export_refused(cli_env, path, tmp_path, "non-finite")
    # block types find it from their block statistics instead of a separate pass
    (tmp_path / "out").rmdir()
    _assert_export_refused(cli_env, path, tmp_path, "non-finite", "--gguf-type", "Q4_0")


@pytest.mark.slow  # two evals per case (about 18 s each); CI runs it with the slow tests
@pytest.mark.parametrize("name", sorted(NONFINITE))
def test_eval_refuses_nonfinite_unless_allowed(
    bad_sources: Sources, cases_root: Path, cli_env: dict[str, str], eval_text: Path, name: str
) -> None:
    path = NONFINITE[name](bad_sources, cases_root / f"eval-{name}")
    args = ["eval", str(path), "--text", str(eval_text), "--ctx", "32", "--chunks", "1"]
    proc = cllm(cli_env, *args)
    assert_one_line_error(proc, "eval", "non-finite")
    assert "--allow-nonfinite" in proc.stderr

    allowed = cllm(cli_env, *args, "--allow-nonfinite", "--json")
    assert allowed.returncode != 2, allowed.stderr
    assert "Traceback" not in allowed.stderr


TEXT_CASES = {
    "binary": (bytes(range(256)) * 4, "is not UTF-8 text (invalid byte 0x80 at offset 128)"),
    "latin-1": ("café crème brûlée ".encode("latin-1") * 50, "is not UTF-8 text"),
    "nul-bytes": (b"\x00" * 4096, "holds NUL bytes"),
    "empty": (b"", "is empty"),
    "blank": (b" \n\t\n" * 10, "is empty"),
}


@pytest.mark.parametrize("name", sorted(TEXT_CASES))
def test_bad_calibration_text_is_refused(tiny_model: Path, tmp_path: Path, name: str) -> None:
    from cllm.core.calib import load_calibration
    from cllm.errors import InputError

    data, expect = TEXT_CASES[name]
    calib = tmp_path / f"{name}.bin"
    calib.write_bytes(data)
    with pytest.raises(InputError, match=re.escape(expect)) as err:
        load_calibration(calib, tiny_model, samples=4, seqlen=32, seed=0)
    assert f"calibration file {calib}" in err.value.one_line()


@pytest.mark.parametrize("name", ["binary"])  # the reported case, end to end; the rest above
def test_bad_calibration_text_is_one_line(
    tiny_model: Path, cli_env: dict[str, str], tmp_path: Path, name: str
) -> None:
    data, expect = TEXT_CASES[name]
    calib = tmp_path / f"{name}.bin"
    calib.write_bytes(data)
    out = tmp_path / "q"
    proc = cllm(cli_env, "quantize", str(tiny_model), "--method", "gptq", "--bits", "4",
                "--calib", str(calib), "-o", str(out))  # fmt: skip
    assert_one_line_error(proc, "quantize", expect)
    assert f"calibration file {calib}" in proc.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [calib.name]


def test_too_short_calibration_text_is_one_line(
    tiny_model: Path, cli_env: dict[str, str], tmp_path: Path
) -> None:
    calib = tmp_path / "short.txt"
    calib.write_text("A few words only.\n")
    proc = cllm(cli_env, "quantize", str(tiny_model), "--method", "gptq", "--calib", str(calib),
                "-o", str(tmp_path / "q"))  # fmt: skip
    assert_one_line_error(proc, "quantize", "fewer than --calib-samples")


@pytest.mark.parametrize("name", ["binary", "nul-bytes", "empty"])
def test_bad_evaluation_text_is_one_line(
    tiny_model: Path, cli_env: dict[str, str], tmp_path: Path, name: str
) -> None:
    data, expect = TEXT_CASES[name]
    text = tmp_path / f"{name}.txt"
    text.write_bytes(data)
    proc = cllm(cli_env, "eval", str(tiny_model), "--text", str(text), "--ctx", "32")
    assert_one_line_error(proc, "eval", expect)
    assert f"evaluation text {text}" in proc.stderr


def test_too_short_evaluation_text_is_one_line(
    tiny_model: Path, cli_env: dict[str, str], tmp_path: Path
) -> None:
    text = tmp_path / "short.txt"
    text.write_text("Too short to hold one chunk.\n")
    proc = cllm(cli_env, "eval", str(tiny_model), "--text", str(text), "--ctx", "64")
    assert_one_line_error(proc, "eval", "fewer than one chunk of 64")
