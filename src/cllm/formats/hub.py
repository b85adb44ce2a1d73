"""Hugging Face hub ids as inputs, for users who are online. Never required: aliases and
local paths need no network, and nothing in cllm's tests touches it.

A hub id is fetched once with `huggingface_hub` into its usual cache (HF_HOME / HF_HUB_CACHE)
and read from there afterwards, offline too. Only what cllm reads is downloaded: configs,
safetensors weights and tokenizer files. Every way the hub can fail ends as one line
saying which of them it was, since "no network", "no such repository" and "gated" need
different things from the user.
"""

from __future__ import annotations

import re
from pathlib import Path

from cllm.errors import InputError

PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model", "*.tiktoken"]


def looks_like_hub_id(text: str) -> bool:
    """`org/name`: one slash, no leading dot or slash (paths that do not exist are asked
    of the hub only in this shape)."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text)) and not text.startswith(
        (".", "/")
    )


def download(repo_id: str) -> Path:
    """The local snapshot folder of `repo_id`, fetched first if it is not cached."""
    try:
        from huggingface_hub import errors as hub_errors
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise InputError(
            f"no such file or folder: {repo_id}", "Install huggingface_hub to load hub ids"
        ) from exc
    what = f"no such file or folder: {repo_id}, and as a hub id"
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=PATTERNS))
    except hub_errors.GatedRepoError as exc:
        raise InputError(
            f"{what} it is a gated model",
            "Accept its licence on huggingface.co, then log in with `hf auth login`",
        ) from exc
    except hub_errors.RepositoryNotFoundError as exc:
        raise InputError(
            f"{what} it does not exist (or is private)",
            "Check the id; for a private model log in with `hf auth login`",
        ) from exc
    except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled) as exc:
        raise InputError(
            f"{what} it cannot be fetched: no connection to the hub (or HF_HUB_OFFLINE is set)"
            " and it is not in the local hub cache",
            "Fetch it once while online, or give a local path or an alias",
        ) from exc
    except Exception as exc:  # noqa: BLE001 - the hub's other errors are many and untyped
        raise InputError(
            f"{what} it could not be fetched ({type(exc).__name__}: {exc})".splitlines()[0],
            "Give a local path or an alias, or check the network",
        ) from exc
    if not any(folder.glob("*.safetensors")):
        raise InputError(
            f"hub model {repo_id} has no safetensors weights",
            "cllm reads safetensors and GGUF; convert the checkpoint first",
        )
    return folder
