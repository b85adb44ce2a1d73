"""Hub ids without a network: a model in the local hub cache opens offline, and one that is
not cached fails with one line that says why. (The cache is laid out as huggingface_hub
lays it out: models--org--name/refs/main naming a snapshot folder.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cllm.testing.tiny import save_tiny_family
from tests.conftest import run_cli


def _hub_cache(root: Path, repo: str, model: Path) -> Path:
    commit = "0123456789abcdef0123456789abcdef01234567"
    entry = root / ("models--" + repo.replace("/", "--"))
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    shutil.copytree(model, entry / "snapshots" / commit)
    return root


def test_cached_hub_id_opens_offline_and_uncached_one_is_one_line(tmp_path: Path) -> None:
    model = save_tiny_family(tmp_path / "src", "qwen2", seed=3)
    cache = _hub_cache(tmp_path / "hub", "cllm-test/tiny-qwen2", model)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    ok = run_cli("info", "cllm-test/tiny-qwen2", "--no-sparsity", "--json", env=env)
    assert ok.returncode == 0, ok.stderr
    rep = json.loads(ok.stdout)
    assert rep["family"] == "Qwen2/2.5" and rep["path"].startswith(str(cache))
    missing = run_cli("info", "cllm-test/not-cached", env=env)
    assert missing.returncode == 2 and missing.stdout == ""
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cllm info: error: no such file or folder")
    assert "no connection to the hub" in lines[0] and "not in the local hub cache" in lines[0]
