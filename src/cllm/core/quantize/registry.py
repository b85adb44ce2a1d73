"""`QUANTIZERS`: quantization method name / config type -> handler.

A handler takes (checkpoint, grid plan, tensor names, config, `QuantContext`) and returns a
store the writers read per-tensor results from (RTN computes them on demand; calibrated
methods leave them in a resumable state folder).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cllm.core.registry import Registry


@dataclass
class QuantContext:
    calibration: Any = None  # cllm.core.calib.Calibration for calibrated methods
    state_dir: Path | None = None
    job_id: str = ""
    provenance: dict[str, Any] | None = None
    resume: bool = False
    on_layer: Callable[[int, int], None] | None = None


QuantHandler = Callable[..., Any]
QUANTIZERS: Registry[QuantHandler] = Registry("quantization method")
