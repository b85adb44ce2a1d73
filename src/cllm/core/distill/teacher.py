"""The teacher's side of the loss: passes on the fly, or a top-k cache on disk.

On the fly the teacher runs in eval mode without gradients for every batch (optionally
with bf16 weights), under the same autocast as the student's step, as in TRL's trainer:
on an AMX CPU a teacher pass took 0.37 s in fp32 and 0.22 s under bf16 autocast, in a
step of about 1.4 s. With `--teacher-cache DIR --top-k K` each training window's
teacher log-probabilities (at the run's temperature) are reduced to their K largest values
and token ids and written once, one small file per window; any later step, epoch or run
that visits the window reads it instead of running the teacher. The cache folder records
what it was made from (teacher and text hashes, window length, K, temperature) and is
refused by a run that differs in any of them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cllm.errors import InputError

CACHE_SCHEMA = "cllm.teacher-cache/1"
KEY_FILE = "cache.json"


@dataclass
class TeacherOutput:
    logits: torch.Tensor | None  # [B, L, V] float32 (on the fly)
    top_logp: torch.Tensor | None  # [B, L, K] (cached)
    top_ids: torch.Tensor | None  # [B, L, K] int64
    hidden: dict[int, torch.Tensor] | None = None  # decoder layer -> its raw output
    attentions: tuple[torch.Tensor, ...] | None = None


class Teacher:
    """A frozen model: logits, and hidden states / attentions when the losses ask.

    It is built on first use: a run whose every window is in the teacher cache (and that
    does not evaluate) never reads the teacher's weights at all."""

    def __init__(
        self,
        build: Callable[[], Any],
        config: dict[str, Any],
        dtype: str = "fp32",
        precision: str = "fp32",
    ) -> None:
        self._build = build
        self._model: Any = None
        self.config = config  # the checkpoint's config.json: depth, width and heads
        self.dtype = dtype
        self.precision = precision  # the training step's: "bf16" runs the passes in autocast
        self.device: Any = None  # set by the loop (accelerate's device) before first use

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def model(self) -> Any:
        if self._model is None:
            model = self._build()
            if self.dtype == "bf16":
                model.to(torch.bfloat16)
            if self.device is not None:
                model.to(self.device)
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            self._model = model
        return self._model

    def __call__(
        self, ids: torch.Tensor, layers: list[int] | None = None, attentions: bool = False
    ) -> TeacherOutput:
        # no_grad rather than inference_mode: the outputs enter the student's loss, which
        # autograd refuses for inference tensors unless they are copied first
        model = self.model
        device = next(model.parameters()).device.type
        autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=self.precision == "bf16")
        with torch.no_grad(), autocast, LayerTap(model, self.config, layers or []) as tap:
            out = model(input_ids=ids, use_cache=False, output_attentions=attentions)
        logits = out.logits.float()
        hidden = {i: h.float() for i, h in tap.outputs.items()} if layers else None
        att = tuple(a.float() for a in out.attentions) if attentions else None
        return TeacherOutput(logits, None, None, hidden, att)


class LayerTap:
    """Forward hooks on some decoder layers, keeping each one's output: the residual stream
    as the layer hands it on. transformers' `output_hidden_states` replaces the last
    layer's output with the final norm's, so a pair with one side at a model's last layer
    would compare a normalised state with a raw one; hooks see the same thing everywhere."""

    def __init__(self, model: Any, config: dict[str, Any], layers: list[int]) -> None:
        from cllm.formats.arch import layers_for_config

        self.outputs: dict[int, torch.Tensor] = {}
        self._handles = []
        if layers:
            prefix = layers_for_config(config).layer_prefix.rstrip(".")
            stack = model.get_submodule(prefix)
            for i in layers:
                self._handles.append(stack[i].register_forward_hook(self._keep(i)))

    def _keep(self, i: int) -> Callable[..., None]:
        def hook(_module: Any, _args: Any, output: Any) -> None:
            self.outputs[i] = output[0] if isinstance(output, tuple) else output

        return hook

    def __enter__(self) -> LayerTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class TopKCache:
    """Top-k teacher log-probabilities per training window, filled on first use."""

    def __init__(self, folder: Path, key: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.key = {"schema": CACHE_SCHEMA, **key}
        self.k = int(key["top_k"])
        self.hits = 0
        self.misses = 0
        self._open()

    def _open(self) -> None:
        key_path = self.folder / KEY_FILE
        if self.folder.exists() and not self.folder.is_dir():
            raise InputError(
                f"--teacher-cache {self.folder} is a file",
                "Give a folder (it is created if missing)",
            )
        if key_path.exists():
            try:
                found = json.loads(key_path.read_text())
            except (OSError, ValueError) as exc:
                raise InputError(
                    f"--teacher-cache {self.folder}: {KEY_FILE} is unreadable ({exc})",
                    "Delete the folder or pass another one",
                ) from None
            diff = describe_difference(found, self.key)
            if diff:
                raise InputError(
                    f"--teacher-cache {self.folder} was made for other settings ({diff})",
                    "Pass another folder, or delete this one to rebuild it",
                )
            return
        # another process of the same run may be writing its copy of the key (a dot file)
        if self.folder.is_dir() and any(not f.name.startswith(".") for f in self.folder.iterdir()):
            raise InputError(
                f"--teacher-cache {self.folder} is a folder cllm did not write (no {KEY_FILE})",
                "Pass an empty or new folder",
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(key_path, (json.dumps(self.key, indent=1, sort_keys=True) + "\n").encode())

    def _path(self, window: int) -> Path:
        return self.folder / f"w{window:07d}.npz"

    def get(
        self, windows: list[int], ids: torch.Tensor, teacher: Teacher | None, temperature: float
    ) -> TeacherOutput:
        """The cached entries of `windows` (whose tokens are `ids`), computing the missing
        ones with `teacher` in one batch."""
        from cllm.core.distill.losses import teacher_topk

        values: list[np.ndarray | None] = []
        indices: list[np.ndarray | None] = []
        missing = []
        for j, w in enumerate(windows):
            entry = self._read(w)
            if entry is None:
                missing.append(j)
                values.append(None)
                indices.append(None)
            else:
                values.append(entry[0])
                indices.append(entry[1])
        self.hits += len(windows) - len(missing)
        self.misses += len(missing)
        if missing:
            if teacher is None:
                raise InputError(
                    f"--teacher-cache {self.folder} lacks windows and no teacher is loaded"
                )
            out = teacher(ids[missing])
            assert out.logits is not None
            v, i = teacher_topk(out.logits, self.k, temperature)
            for row, j in enumerate(missing):
                vj = v[row].to(torch.float16).cpu().numpy()
                ij = i[row].to(torch.int32).cpu().numpy()
                self._write(windows[j], vj, ij)
                values[j], indices[j] = vj, ij
        top = torch.from_numpy(np.stack([np.asarray(x) for x in values])).float()
        idx = torch.from_numpy(np.stack([np.asarray(x) for x in indices])).long()
        return TeacherOutput(None, top, idx)

    def _read(self, window: int) -> tuple[np.ndarray, np.ndarray] | None:
        path = self._path(window)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                v, i = z["values"], z["indices"]
        except (OSError, ValueError, KeyError):
            return None  # a damaged entry is recomputed
        if v.shape != (self.key["seqlen"], self.k) or i.shape != v.shape:
            return None
        return v, i

    def _write(self, window: int, values: np.ndarray, indices: np.ndarray) -> None:
        import io

        buf = io.BytesIO()
        np.savez(buf, values=values, indices=indices)
        _write_atomic(self._path(window), buf.getvalue())


def describe_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """`lr 0.0001 -> 0.0002; steps 300 -> 600`: the keys whose values differ."""
    parts = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            parts.append(f"{key} {_short(old.get(key))} -> {_short(new.get(key))}")
    return "; ".join(parts)


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    if isinstance(value, str) and len(value) == 64:
        return value[:12]  # a sha256
    return text if len(text) <= 40 else text[:37] + "..."


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
