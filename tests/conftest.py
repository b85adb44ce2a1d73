"""Shared fixtures: an isolated cache, a tiny real Llama, a small text, the real SmolLM2."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cllm.testing.badfiles import Sources

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    # tests never touch the user's cache unless CLLM_TEST_CACHE says where to keep one
    cache = os.environ.get("CLLM_TEST_CACHE") or tempfile.mkdtemp(prefix="cllm-test-cache-")
    os.environ["CLLM_CACHE"] = cache
    os.environ.pop("CLLM_DEBUG", None)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cllm.testing.tiny import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cllm.testing.tiny import tiny_text as make

    path = tmp_path_factory.mktemp("text") / "tiny.txt"
    path.write_text(make(3000))
    return path


@pytest.fixture(scope="session")
def calib(tiny_model: Path, tiny_text: Path):  # noqa: ANN201
    """16 calibration windows of 64 tokens from the tiny text (GPTQ/AWQ tests)."""
    from cllm.core.quantize.calib import load_calibration
    from cllm.formats.checkpoint import open_checkpoint

    return load_calibration(
        tiny_text, open_checkpoint(tiny_model).tokenizer_dir(), samples=16, seqlen=64, seed=0
    )


@pytest.fixture(scope="session")
def wiki_text() -> Path:
    from cllm.paths import default_eval_text

    path = default_eval_text()
    assert path.exists(), f"WikiText-2 test text not found at {path}; set CLLM_DATA_DIR"
    return path


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real model: the alias converted once (per test cache) to an fp32 HF folder."""
    from cllm.formats.aliases import resolve

    return resolve("smollm2-135m")


@pytest.fixture(scope="session")
def bad_sources(tmp_path_factory: pytest.TempPathFactory) -> Sources:
    """The valid tiny model and GGUF every malformed case is derived from, built once."""
    from cllm.testing.badfiles import make_sources

    return make_sources(tmp_path_factory.getbasetemp() / "badfiles-sources")


def run_cli(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run the real `cllm` in a subprocess, as a shell pipeline would."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "cllm", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"cllm {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc
