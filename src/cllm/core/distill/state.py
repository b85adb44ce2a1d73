"""Resumable training state, saved every `--save-every` steps beside the output.

Each save is a complete folder `step-NNNNNN/` (trainable weights as safetensors, the
optimizer's state, a JSON of the step, losses so far, schedule and RNG) written under a
temporary name and renamed into place, after which older saves are removed: a run killed
at any moment leaves the last complete save to resume from. The optimizer state is read
back with `torch.load(weights_only=True)`, which loads tensors and plain containers only.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cllm.formats.atomic import fsync_file

STATE_SCHEMA = "cllm.distill-state/1"


@dataclass
class Saved:
    path: Path
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def latest(folder: Path) -> Saved | None:
    """The newest complete save under `folder`, if any."""
    if not folder.is_dir():
        return None
    best: Saved | None = None
    for sub in folder.glob("step-*"):
        meta_path = sub / "state.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        if meta.get("schema") != STATE_SCHEMA:
            continue
        saved = Saved(sub, meta)
        if best is None or saved.step > best.step:
            best = saved
    return best


def save(
    folder: Path,
    step: int,
    params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:06d}"
    tmp = folder / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {k: v.detach().contiguous().clone() for k, v in params.items()}
    tensors["__rng__"] = torch.get_rng_state()
    save_file(tensors, str(tmp / "weights.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(
        json.dumps({"schema": STATE_SCHEMA, "step": step, **meta}, sort_keys=True)
    )
    for f in tmp.iterdir():
        fsync_file(f)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in folder.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load(
    saved: Saved, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer
) -> None:
    """Put a save's weights, optimizer state and RNG back in place."""
    from safetensors.torch import load_file

    tensors = load_file(str(saved.path / "weights.safetensors"))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])
    torch.set_rng_state(tensors["__rng__"])
    optimizer.load_state_dict(torch.load(saved.path / "optimizer.pt", weights_only=True))


def remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
