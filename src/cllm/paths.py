"""Where cllm keeps caches and finds its default data.

Kept torch-free: the CLI imports it at start-up.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of cllm's caches (converted aliases, tokenizers, base logits, hashes)."""
    env = os.environ.get("CLLM_CACHE")
    if env:
        path = Path(env).expanduser()
    else:
        from platformdirs import user_cache_dir

        path = Path(user_cache_dir("cllm"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir() -> Path:
    """Folder with the offline evaluation data (wikitext-2/, calibration/, tasks/).

    `$CLLM_DATA_DIR` wins; otherwise the `shared/data` folder beside the project
    checkout (how the development machines and CI lay it out).
    """
    env = os.environ.get("CLLM_DATA_DIR")
    if env:
        return Path(env).expanduser()
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent.parent / "shared" / "data"
        if (parent / "pyproject.toml").exists() and candidate.is_dir():
            return candidate
    return Path.cwd().parent / "shared" / "data"


def default_eval_text() -> Path:
    return data_dir() / "wikitext-2" / "wiki.test.raw"
