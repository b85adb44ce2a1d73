"""What every pruning method shares: its scope options, what its handler gets and returns.

A method is one module in this package: a config dataclass (recorded in provenance, built by
the CLI from flags or by Python callers directly) and a handler registered in `PRUNERS`:

    @PRUNERS.register("wanda", WandaConfig)
    def prune_wanda(ckpt, cfg, ctx) -> PrunedModel: ...

The job pipeline (`cllm.core.prune.job`) validates the config, loads calibration when
`cfg.needs_calibration()`, names and claims the output, calls the handler, and writes the
`PrunedModel` it returns as an HF folder, atomically, with provenance.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cllm.core.calib import CalibrationOptions
from cllm.core.quantize.methods import keep_patterns
from cllm.core.registry import Registry
from cllm.errors import UsageError

if TYPE_CHECKING:
    from cllm.core.calib import Calibration
    from cllm.formats.checkpoint import Checkpoint
    from cllm.formats.safetensors_io import PlannedTensor


@dataclass
class PruneContext:
    """What the pipeline hands a handler besides the checkpoint and the config."""

    calibration: Calibration | None = None
    state_dir: Path | None = None  # where layer-by-layer methods keep resumable state
    job_id: str = ""
    provenance: dict[str, Any] | None = None
    resume: bool = False
    on_layer: Callable[[int, int], None] | None = None  # (layer done, layers) for progress
    # per-decoder-layer sparsity from `--profile FILE` (a sensitivity JSON), decided upstream
    layer_sparsity: list[float] | None = None


@dataclass
class PrunedModel:
    """A handler's result: the output's config.json and its tensors, planned lazily so the
    writer reads them one at a time."""

    config: dict[str, Any]
    plans: list[PlannedTensor]
    report: dict[str, Any] = field(default_factory=dict)
    cleanup: Callable[[], None] | None = None  # called after the output is written


@dataclass
class UnstructuredScope(CalibrationOptions):
    """Options of the methods that zero individual weights (magnitude, Wanda, SparseGPT)."""

    sparsity: float = 0.5  # fraction of each selected weight matrix set to zero
    pattern: str | None = None  # "N:M": keep N of every M consecutive input weights
    layers: str | None = None  # decoder layers to prune, e.g. "4-25" or "0,2,5-7"; None = all
    keep: list[str] = field(default_factory=list)  # regexes of linear weights left dense
    profile: str = "uniform"  # uniform | owl | file (per-layer sparsities given by the caller)
    owl_m: float = 5.0  # OWL: a weight is an outlier when its score exceeds M x the layer mean
    owl_lambda: float = 0.08  # OWL: per-layer sparsities stay within sparsity +- lambda

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def needs_calibration(self) -> bool:
        return True

    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern) if self.pattern else None

    def validate(self) -> None:
        self.check_calibration()
        if self.pattern:
            n, m = parse_pattern(self.pattern)
            if self.sparsity != 0.5 and abs(self.sparsity - (1 - n / m)) > 1e-9:
                raise UsageError(
                    f"--pattern {self.pattern} fixes the sparsity at {1 - n / m:g}",
                    "Drop --sparsity",
                )
            if self.profile != "uniform":
                raise UsageError(
                    f"--profile {self.profile} varies sparsity per layer; --pattern {self.pattern} fixes it",
                    "Use one or the other",
                )
        elif not 0 <= self.sparsity < 1:
            raise UsageError(f"--sparsity {self.sparsity} is outside [0, 1)", "e.g. --sparsity 0.5")
        if self.profile not in ("uniform", "owl", "file"):
            raise UsageError(
                f"--profile {self.profile} is not known", "Use uniform, owl or a sensitivity JSON"
            )
        if self.owl_m <= 0 or not 0 <= self.owl_lambda < 1:
            raise UsageError("--owl-m must be > 0 and --owl-lambda in [0, 1)")
        if self.profile == "owl" and (
            self.sparsity - self.owl_lambda < 0 or self.sparsity + self.owl_lambda >= 1
        ):
            raise UsageError(
                f"--owl-lambda {self.owl_lambda} takes some layers' sparsity outside [0, 1)",
                "Use a smaller --owl-lambda",
            )
        keep_patterns(self.keep)
        if self.layers is not None:
            parse_layers(self.layers, None)


def parse_pattern(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text or "")
    if not m:
        raise UsageError(f"--pattern {text!r} is not N:M", "e.g. --pattern 2:4")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm:
        raise UsageError(
            f"--pattern {text}: N must be at least 1 and smaller than M", "e.g. 2:4 or 4:8"
        )
    return n, mm


def parse_layers(text: str, n_layers: int | None) -> list[int]:
    """'4-25', '0,2,5-7' -> layer indices (checked against n_layers when known)."""
    out: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise UsageError(f"--layers {text!r} is not a list of ranges", "e.g. --layers 4-25")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        if b < a:
            raise UsageError(f"--layers {text!r}: range {a}-{b} runs backwards")
        out.update(range(a, b + 1))
    if n_layers is not None and out and max(out) >= n_layers:
        raise UsageError(
            f"--layers {text} names layer {max(out)}, but the model has {n_layers} (0-{n_layers - 1})"
        )
    return sorted(out)


PruneHandler = Callable[[Any, Any, PruneContext], PrunedModel]
PRUNERS: Registry[PruneHandler] = Registry("pruning method")


def prune(ckpt: Checkpoint, cfg: Any, ctx: PruneContext | None = None) -> PrunedModel:
    """Run a registered method (the Python API's entry; the CLI goes through the job pipeline)."""
    import cllm.core.prune.methods  # noqa: F401 - registers the built-in methods

    cfg.validate()
    ctx = ctx or PruneContext()
    if cfg.needs_calibration() and ctx.calibration is None:
        ctx.calibration = cfg.load_calibration(ckpt.tokenizer_dir())
    return PRUNERS.handler_for(cfg)(ckpt, cfg, ctx)
