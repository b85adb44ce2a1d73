"""Generated docs (man pages, shell completions, docs/cli.md) match the CLI and work."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cllm import gen

REPO = Path(__file__).resolve().parents[1]
MAN_PAGES = sorted((REPO / "man").glob("*.1"))


def test_generated_files_are_up_to_date() -> None:
    stale = gen.check_all(REPO)
    assert not stale, (
        f"generated files are out of date: {', '.join(stale)}. "
        "Run `make gen` (python -m cllm.gen) and commit the result."
    )


def test_generation_is_deterministic() -> None:
    assert gen.render_all() == gen.render_all()


def test_every_command_has_a_man_page_and_a_section() -> None:
    names = list(gen.get_cli().commands)
    assert names, "no subcommands found"
    pages = {p.name for p in MAN_PAGES}
    assert pages == {"cllm.1", *(f"cllm-{n}.1" for n in names)}
    markdown = (REPO / "docs" / "cli.md").read_text()
    for name in names:
        assert f"## `cllm {name}`" in markdown
        assert f"cllm [GLOBAL OPTIONS] {name} [OPTIONS]" in markdown


def test_man_pages_have_the_expected_sections() -> None:
    group = (REPO / "man" / "cllm.1").read_text()
    for heading in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "COMMANDS", "EXIT STATUS"):
        assert f"\n.SH {heading}\n" in group
    for var in ("CLLM_CACHE", "CLLM_DATA_DIR", "CLLM_DEBUG", "NO_COLOR"):
        assert f".B {var}\n" in group
    assert ".B 130\n" in group
    export = (REPO / "man" / "cllm-export.1").read_text()
    for heading in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXIT STATUS", "SEE ALSO"):
        assert f"\n.SH {heading}\n" in export
    assert r"\fB\-\-to\fR {\fBgguf\fR|\fBsafetensors\fR|\fBonnx\fR|\fBbundle\fR}" in export
    assert r"cllm export smollm2\-135m \-\-to gguf" in export  # the docstring's example


@pytest.mark.parametrize("page", MAN_PAGES, ids=lambda p: p.name)
def test_man_page_is_valid_roff(page: Path) -> None:
    text = page.read_text()
    assert re.search(r"^\.TH ", text, flags=re.M), "no .TH header"
    assert text.lstrip().startswith((".TH", '.\\"'))
    man = shutil.which("man")
    if man is None:
        pytest.skip("man is not installed")
    env = {**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8", "MANPAGER": "cat", "PAGER": "cat"}
    proc = subprocess.run(
        [man, "--warnings", "-l", str(page)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", f"man --warnings complained about {page.name}:\n{proc.stderr}"
    assert "NAME" in proc.stdout


def _cllm_bin_dir(tmp_path: Path) -> Path:
    """A directory whose `cllm` is this checkout's entry point (the console script if installed)."""
    script = Path(sys.executable).with_name("cllm")
    if script.is_file() and os.access(script, os.X_OK):
        return script.parent
    wrapper = tmp_path / "bin" / "cllm"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m cllm "$@"\n')
    wrapper.chmod(0o755)
    return wrapper.parent


def _bash_complete(tmp_path: Path, words: list[str]) -> list[str]:
    """Source completions/cllm.bash in bash and run its function as Tab would on `words`."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    script = REPO / "completions" / "cllm.bash"
    func = re.search(r"^complete .*-F (\S+) cllm$", script.read_text(), flags=re.M)
    assert func, "the bash script registers no completion function for cllm"
    path = f"{_cllm_bin_dir(tmp_path)}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path}
    env.pop("_CLLM_COMPLETE", None)
    words_sh = " ".join(f"'{w}'" for w in words)
    program = (
        f"source '{script}'\n"
        f"COMP_WORDS=({words_sh}); COMP_CWORD={len(words) - 1}\n"
        f"{func.group(1)} cllm\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    proc = subprocess.run(
        [bash, "--norc", "--noprofile", "-c", program],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    return [line for line in proc.stdout.splitlines() if line]


def test_bash_completion_completes_a_command(tmp_path: Path) -> None:
    got = _bash_complete(tmp_path, ["cllm", "ex"])
    assert got == ["export"], (
        f"`cllm ex<Tab>` gave {got}; `cllm` must answer _CLLM_COMPLETE=complete_bash "
        "(Typer's completion classes must be registered at run time)"
    )


def test_bash_completion_completes_choices(tmp_path: Path) -> None:
    assert _bash_complete(tmp_path, ["cllm", "export", "--to", ""]) == [
        "gguf",
        "safetensors",
        "onnx",
        "bundle",
    ]


def test_completion_protocol_directly(tmp_path: Path) -> None:
    """The env protocol the script uses, without bash: COMP_WORDS + _CLLM_COMPLETE."""
    text = (REPO / "completions" / "cllm.bash").read_text()
    instruction = re.search(r"_CLLM_COMPLETE=(\w+)", text)
    assert instruction
    env = {
        **os.environ,
        "COMP_WORDS": "cllm ex",
        "COMP_CWORD": "1",
        "_CLLM_COMPLETE": instruction.group(1),
    }
    proc = subprocess.run(
        [str(_cllm_bin_dir(tmp_path) / "cllm")],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["export"]


def test_importing_the_cli_does_not_import_torch() -> None:
    code = "import cllm.cli, sys; assert 'torch' not in sys.modules, 'cllm.cli imported torch'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_check_reports_a_stale_file(tmp_path: Path) -> None:
    written = gen.write_all(tmp_path)
    assert {p.relative_to(tmp_path).as_posix() for p in written} == set(gen.render_all())
    assert gen.check_all(tmp_path) == []
    (tmp_path / "docs" / "cli.md").write_text("edited by hand\n")
    (tmp_path / "man" / "cllm-removed.1").write_text(".TH X 1\n")
    assert gen.check_all(tmp_path) == ["docs/cli.md", "man/cllm-removed.1"]
    gen.write_all(tmp_path)
    assert gen.check_all(tmp_path) == []
    assert not (tmp_path / "man" / "cllm-removed.1").exists()
