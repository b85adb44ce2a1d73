"""Calibration data: N windows of L tokens from a plain-text file, chosen by a seeded RNG."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cllm.errors import InputError


@dataclass(frozen=True)
class Calibration:
    ids: torch.Tensor  # [samples, seqlen] int64
    path: str
    sha256: str
    seed: int

    def to_provenance(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "sha256": self.sha256,
            "samples": int(self.ids.shape[0]),
            "seqlen": int(self.ids.shape[1]),
            "seed": self.seed,
        }


def default_calibration_file() -> Path:
    from cllm.paths import data_dir

    return data_dir() / "calibration" / "wikitext-2-valid.tokens"


def load_calibration(
    path: Path, tokenizer_dir: Path, samples: int, seqlen: int, seed: int
) -> Calibration:
    """Tokenize the file once (cached) and draw `samples` random windows of `seqlen` tokens."""
    from cllm.core.eval.data import load_tokens

    path = Path(path)
    if samples < 1 or seqlen < 8:
        raise InputError(
            f"--calib-samples {samples} / --calib-seqlen {seqlen} are too small",
            "Use at least 1 sample of 8 tokens",
        )
    if not path.is_file():
        raise InputError(f"calibration file not found: {path}", "Pass --calib FILE (plain text)")
    toks = load_tokens(path, tokenizer_dir, what="calibration file")
    n = len(toks.ids)
    need = samples * seqlen
    if n < need:
        raise InputError(
            f"calibration file {path} has {n} tokens, fewer than --calib-samples {samples} x --calib-seqlen {seqlen} = {need}",
            "Use a longer file or fewer/shorter samples",
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seqlen + 1, (samples,), generator=gen)
    ids = torch.as_tensor(toks.ids)
    windows = torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
    return Calibration(windows, str(path), toks.text_sha256, seed)
