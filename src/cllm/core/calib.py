"""Calibration data (N windows of L tokens from a plain-text file, chosen by a seeded RNG) and
the options every calibrated method shares, quantize's and prune's alike."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cllm.errors import InputError, UsageError


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


@dataclass
class CalibrationOptions:
    """The calibration fields of every calibrated method's config (GPTQ, AWQ, Wanda, SparseGPT,
    structured and depth pruning): one set of flags, one meaning, one provenance record."""

    calib: str | None = None  # plain-text file; None = the shipped WikiText-2 validation text
    calib_samples: int = 128
    calib_seqlen: int = 512
    seed: int = 0
    batch_size: int = 8
    compute_dtype: str = "auto"  # calibration forward passes: auto | fp32 | bf16

    def check_calibration(self) -> None:
        if self.compute_dtype not in ("auto", "fp32", "bf16"):
            raise UsageError(
                f"--calib-dtype {self.compute_dtype} is not supported", "Use auto, fp32 or bf16"
            )
        if self.calib_samples < 1 or self.calib_seqlen < 8:
            raise UsageError(
                f"--calib-samples {self.calib_samples} / --calib-seqlen {self.calib_seqlen} are too small",
                "Use at least 1 sample of 8 tokens",
            )

    def load_calibration(self, tokenizer_dir: Path) -> Calibration:
        return load_calibration(
            Path(self.calib) if self.calib else default_calibration_file(),
            tokenizer_dir,
            self.calib_samples,
            self.calib_seqlen,
            self.seed,
        )


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
