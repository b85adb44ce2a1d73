"""Where per-tensor quantization results live between the method and the writer.

RTN computes on demand (streaming, nothing kept); GPTQ and AWQ write each finished
layer to a state folder beside the output, which is also what `--resume` reads.
AWQ also changes some tensors it leaves unquantized (it folds its scales into the
norm weights): the store carries those too, and the writers take them from it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from cllm.core.quantize.grid import GridPlan, grid_for, layer_of, quantize_rtn
from cllm.core.quantize.methods import QuantResult
from cllm.formats.checkpoint import Checkpoint

_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.")


class RTNStore:
    def __init__(
        self, ckpt: Checkpoint, grid: GridPlan, names: list[str], clip: bool = False
    ) -> None:
        self.ckpt, self.grid, self.names, self.clip = ckpt, grid, set(names), clip
        self._last: tuple[str, QuantResult] | None = None

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def get(self, name: str) -> QuantResult:
        if self._last is not None and self._last[0] == name:
            return self._last[1]
        w = self.ckpt.get(name).float()
        grid = grid_for(self.grid, layer_of(name))
        codes, scales, zeros = quantize_rtn(w, grid, self.clip)
        res = QuantResult(codes, scales, zeros, grid.group_width(w.shape[1]))
        self._last = (name, res)
        return res

    def get_dense(self, name: str) -> torch.Tensor | None:
        """RTN changes no unquantized tensor."""
        return None


class LayerStateStore:
    """Per-layer results on disk: layer-0007.safetensors holds that layer's codes, scales, zeros,
    and `<name>.dense` for each unquantized tensor of the layer the method replaced."""

    def __init__(
        self, folder: Path, job_id: str, names: list[str], provenance: dict[str, Any] | None = None
    ) -> None:
        self.folder = Path(folder)
        self.names = set(names)
        self.job_id = job_id
        self.provenance = provenance
        self._cache: dict[int, dict[str, torch.Tensor]] = {}

    # -- bookkeeping ------------------------------------------------------------
    def open(self, resume: bool) -> int:
        """Prepare the folder; return the first layer still to do (0 unless resuming)."""
        from safetensors.torch import load_file

        meta = self.folder / "state.json"
        if resume and meta.exists():
            state = json.loads(meta.read_text())
            if state.get("job") == self.job_id:
                done = int(state.get("layers_done", 0))
                if done == 0 or (self.folder / "hidden.safetensors").exists():
                    return done
            from cllm.errors import UsageError

            raise UsageError(
                f"{self.folder} holds state of a different run",
                "Use the same input and flags, or drop --resume",
            )
        if self.folder.exists():
            for p in self.folder.iterdir():
                p.unlink()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write_json({"job": self.job_id, "layers_done": 0, "provenance": self.provenance})
        _ = load_file  # imported here so a missing safetensors fails early
        return 0

    def _write_json(self, data: dict[str, Any]) -> None:
        tmp = self.folder / "state.json.tmp"
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.folder / "state.json")

    def save_layer(
        self,
        i: int,
        results: dict[str, QuantResult],
        hidden: torch.Tensor,
        extra_tensors: dict[str, torch.Tensor] | None = None,
    ) -> None:
        from safetensors.torch import save_file

        tensors = {}
        for name, r in results.items():
            tensors[name + ".codes"] = r.codes.to(torch.uint8).contiguous()
            tensors[name + ".scales"] = r.scales.contiguous()
            tensors[name + ".zeros"] = r.zeros.contiguous()
            tensors[name + ".group"] = torch.tensor([r.group_size])
            if r.raw is not None:
                tensors[name + ".raw"] = r.raw.to(torch.uint8).contiguous()
        for name, t in (extra_tensors or {}).items():
            tensors[name + ".dense"] = t.detach().float().contiguous()
        for fname, payload in (
            (f"layer-{i:04d}.safetensors", tensors),
            ("hidden.safetensors", {"hidden": hidden.contiguous()}),
        ):
            tmp = self.folder / (fname + ".tmp")
            save_file(payload, str(tmp))
            os.replace(tmp, self.folder / fname)
        self._write_json({"job": self.job_id, "layers_done": i + 1, "provenance": self.provenance})

    def load_hidden(self) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(str(self.folder / "hidden.safetensors"))["hidden"]

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def _layer(self, i: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        if i not in self._cache:
            self._cache = {i: load_file(str(self.folder / f"layer-{i:04d}.safetensors"))}
        return self._cache[i]

    def get(self, name: str) -> QuantResult:
        t = self._layer(int(name.split(".")[2]))
        return QuantResult(
            t[name + ".codes"].float(),
            t[name + ".scales"],
            t[name + ".zeros"],
            int(t[name + ".group"]),
            t.get(name + ".raw"),
        )

    def get_dense(self, name: str) -> torch.Tensor | None:
        """The replacement of an unquantized tensor (e.g. a norm weight AWQ folded into), if any."""
        m = _LAYER_RE.match(name)
        if m is None or name in self.names:
            return None
        path = self.folder / f"layer-{int(m.group(1)):04d}.safetensors"
        if not path.exists():
            return None
        return self._layer(int(m.group(1))).get(name + ".dense")

    def cleanup(self) -> None:
        for p in self.folder.iterdir():
            p.unlink()
        self.folder.rmdir()


def saved_provenance(folder: Path, job_id: str) -> dict[str, Any] | None:
    """The provenance a killed run recorded, so its resumption writes identical bytes."""
    try:
        state = json.loads((Path(folder) / "state.json").read_text())
    except (OSError, ValueError):
        return None
    prov = state.get("provenance")
    return prov if state.get("job") == job_id and isinstance(prov, dict) else None
