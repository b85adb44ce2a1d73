"""Shared fixtures: an isolated cache, a tiny real Llama, a small text, the real SmolLM2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cllm.testing.badfiles import Sources

REPO = Path(__file__).resolve().parents[1]


_OWN_CACHE: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    # tests never touch the user's cache unless CLLM_TEST_CACHE says where to keep one
    cache = os.environ.get("CLLM_TEST_CACHE")
    if not cache:
        cache = tempfile.mkdtemp(prefix="cllm-test-cache-")
        _OWN_CACHE.append(cache)
    os.environ["CLLM_CACHE"] = cache
    os.environ.pop("CLLM_DEBUG", None)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def pytest_unconfigure(config: pytest.Config) -> None:
    # a temporary cache per run adds up: 200 runs left 9 GB in /tmp before this
    for cache in _OWN_CACHE:
        shutil.rmtree(cache, ignore_errors=True)


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
    from cllm.core.calib import load_calibration
    from cllm.formats.checkpoint import open_checkpoint

    return load_calibration(
        tiny_text, open_checkpoint(tiny_model).tokenizer_dir(), samples=16, seqlen=64, seed=0
    )


@pytest.fixture(scope="session")
def wide_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with rows of 256, so llama.cpp's K and IQ types apply instead of falling
    back to legacy types."""
    from cllm.testing.tiny import save_tiny_llama

    return save_tiny_llama(
        tmp_path_factory.mktemp("wide") / "wide",
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
    )


@pytest.fixture(scope="session")
def tiny_ggufs(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model exported to F32, Q8_0 and Q4_0 GGUFs (with export provenance)."""
    from cllm.formats.checkpoint import open_checkpoint
    from cllm.formats.provenance import make_provenance
    from cllm.formats.save import save_gguf

    ckpt = open_checkpoint(tiny_model)
    out = tmp_path_factory.mktemp("tiny-gguf")
    files = {}
    for t in ("F32", "Q8_0", "Q4_0"):
        files[t] = out / f"tiny.{t}.gguf"
        prov = make_provenance("export", {"to": "gguf", "gguf_type": t}, ckpt.sha256, None)
        save_gguf(files[t], ckpt, t, prov)
    return files


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


def cli_in_process(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The same command through typer's runner in this process: for argument and input
    checks, where a fresh interpreter (~4-9 s of imports each) proves nothing more. An
    exception that escaped the CLI's error handling is re-raised, as a traceback would be."""
    from typer.testing import CliRunner

    from cllm.cli import app

    result = CliRunner().invoke(app, list(args), input=stdin, env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(
        ["cllm", *args], result.exit_code, result.stdout, result.stderr
    )


def quant_provenance(params: dict) -> dict:
    """A provenance record for quantize() calls in tests (fixed parent hash)."""
    from cllm.formats.provenance import make_provenance

    return make_provenance("quantize", params, "0" * 64, None)


def kld_vs_base(model: Path, base: Path, text: Path) -> float:
    """Mean KLD of `model` against `base` on 8 chunks of 64 tokens (torch backend)."""
    from cllm.core.eval.perplexity import EvalConfig
    from cllm.core.eval.run import run_eval
    from cllm.formats.checkpoint import open_checkpoint

    res = run_eval(
        open_checkpoint(model),
        EvalConfig(text=str(text), ctx=64, chunks=8),
        kld_base=open_checkpoint(base),
    )
    assert res.kld is not None
    return res.kld.mean


def assert_transformers_matches_cllm(folder: Path) -> object:
    """A packed output is in a published layout: transformers (compressed-tensors) loads it and
    gives exactly the logits of cllm's own dequantizing reader. Returns transformers' model."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from cllm.core.eval.backends import build_torch_model
    from cllm.formats.checkpoint import open_checkpoint

    cfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    ids = torch.arange(3, 40)[None]
    theirs = AutoModelForCausalLM.from_pretrained(folder).eval()
    ours = build_torch_model(open_checkpoint(folder))
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, ours(ids).logits)
    return theirs


def start_atomic_writer(dest: Path) -> subprocess.Popen[str]:
    """A child process in the middle of writing `dest` through atomic_path (it has written
    part and sleeps); the caller kills it, as `kill -9` would a real run."""
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from cllm.formats.atomic import atomic_path\n"
        "with atomic_path(Path(sys.argv[1])) as tmp:\n"
        "    tmp.write_bytes(b'partial')\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(120)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(dest)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "writing"
    return child
