"""Training windows and held-out chunks.

The training text is cut into non-overlapping windows of `seqlen` tokens (a short tail is
dropped). Each epoch visits them in an order drawn from the seed and the epoch number, so
the windows of optimizer step s are a pure function of (seed, s): a resumed run sees the
same batches as an uninterrupted one, and two processes under accelerate take disjoint
slices of the same global batch without talking to each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cllm.errors import InputError


@dataclass(frozen=True)
class TrainData:
    windows: torch.Tensor  # [n, seqlen] int64
    path: str
    sha256: str  # of the text
    seed: int

    @property
    def n(self) -> int:
        return int(self.windows.shape[0])

    def order(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        return torch.randperm(self.n, generator=gen)

    def batch_indices(self, micro: int, size: int) -> list[int]:
        """Window ids of global micro-batch `micro` (each of `size` windows); batches run on
        through epochs, an epoch's last partial batch taking from the next epoch's order."""
        start = micro * size
        out: list[int] = []
        while len(out) < size:
            pos = start + len(out)
            epoch, offset = divmod(pos, self.n)
            take = min(size - len(out), self.n - offset)
            out.extend(self.order(epoch)[offset : offset + take].tolist())
        return out

    def to_provenance(self) -> dict[str, object]:
        return {
            "path": self.path,
            "sha256": self.sha256,
            "windows": self.n,
            "seqlen": int(self.windows.shape[1]),
            "seed": self.seed,
        }


def default_data_file() -> Path:
    from cllm.core.calib import default_calibration_file

    return default_calibration_file()


def load_train_data(
    path: Path | None, tokenizer_dir: Path, seqlen: int, seed: int, need: int
) -> TrainData:
    """The text as windows; `need` is the windows of one global batch (refused when the
    text holds fewer)."""
    from cllm.core.eval.data import load_tokens

    path = Path(path) if path is not None else default_data_file()
    if not path.is_file():
        raise InputError(f"training text not found: {path}", "Pass --data FILE (plain text)")
    toks = load_tokens(path, tokenizer_dir, what="training text")
    n = len(toks.ids) // seqlen
    if n < need:
        raise InputError(
            f"the training text {path} has {len(toks.ids)} tokens: {n} windows of --seqlen {seqlen}, "
            f"fewer than one batch of {need}",
            "Use a longer --data file, a smaller --batch-size or a shorter --seqlen",
        )
    ids = np.asarray(toks.ids[: n * seqlen], dtype=np.int64).reshape(n, seqlen)
    return TrainData(torch.from_numpy(ids.copy()), str(path), toks.text_sha256, seed)
