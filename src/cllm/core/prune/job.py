"""`cllm prune` as jobs of the shared pipeline (`cllm.core.job`): a pruned model, or a
per-layer x sublayer sensitivity map (`--sensitivity`).

`PruneRequest` holds the command's flags as values. Exactly one kind of pruning runs:
unstructured/N:M (`--method`), structured width (`--structured`) or depth
(`--drop-layers`); the request names the registered method, whose config the job builds
and validates before any input is read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cllm.core.job import CalibratedJob, Events, OutputSpec, state_dir
from cllm.core.prune.base import PRUNERS, PruneContext, UnstructuredScope, parse_layers
from cllm.core.quantize.job import SensitivityMapJob, stored_types
from cllm.errors import UsageError
from cllm.formats.checkpoint import Checkpoint
from cllm.formats.inputs import Source, require_checkpoint
from cllm.formats.outputs import Kind

UNSTRUCTURED = ("magnitude", "wanda", "sparsegpt")
SUBLAYERS = ("attention", "mlp")


@dataclass
class PruneRequest:
    method: str | None = None  # magnitude | wanda | sparsegpt (default wanda)
    sparsity: float | None = None  # default 0.5
    pattern: str | None = None
    layers: str | None = None
    keep: list[str] = field(default_factory=list)
    profile: str = "uniform"  # uniform | owl | path to a `cllm prune --sensitivity` JSON
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    structured: str | None = None  # mlp | heads | hidden
    ratio: float | None = None
    drop_layers: int | None = None
    layer_metric: str = "block-influence"
    dequantize: bool = False
    damp: float = 0.01
    calib: str | None = None
    calib_samples: int = 128
    calib_seqlen: int = 512
    seed: int = 0
    calib_dtype: str = "auto"
    resume: bool = False
    sensitivity_chunks: int = 2

    def calibration_fields(self) -> dict[str, Any]:
        return {
            "calib": self.calib,
            "calib_samples": self.calib_samples,
            "calib_seqlen": self.calib_seqlen,
            "seed": self.seed,
            "compute_dtype": self.calib_dtype,
        }


def prune_config(req: PruneRequest) -> Any:
    """The registered method's config from the flags; flags of another kind of pruning are
    refused rather than ignored."""
    import cllm.core.prune.methods  # noqa: F401 - registers the built-in methods

    kinds = [k for k, on in (
        ("--method", req.method is not None),
        ("--structured", req.structured is not None),
        ("--drop-layers", req.drop_layers is not None),
    ) if on]  # fmt: skip
    if len(kinds) > 1:
        raise UsageError(f"give one of {', '.join(kinds)}", "Each run does one kind of pruning")
    unstructured_flags = (
        req.sparsity is not None
        or req.pattern is not None
        or req.layers is not None
        or bool(req.keep)
        or req.profile != "uniform"
    )
    calib = req.calibration_fields()
    if req.structured is not None or req.drop_layers is not None:
        if unstructured_flags:
            raise UsageError(
                "--sparsity, --pattern, --layers, --keep and --profile apply to --method pruning"
            )
        if req.structured is not None:
            if req.ratio is None:
                raise UsageError("--structured needs --ratio", "e.g. --ratio 0.25")
            cls = PRUNERS.config_class("structured")
            cfg = cls(target=req.structured, ratio=req.ratio, **_dequantize(cls, req), **calib)
        else:
            if req.ratio is not None:
                raise UsageError("--ratio applies to --structured only")
            cls = PRUNERS.config_class("depth")
            cfg = cls(
                drop_layers=req.drop_layers, metric=req.layer_metric, **_dequantize(cls, req),
                **calib,
            )  # fmt: skip
    else:
        if req.ratio is not None:
            raise UsageError("--ratio applies to --structured only", "Use --sparsity")
        method = req.method or "wanda"
        if method not in UNSTRUCTURED:
            raise UsageError(f"unknown --method {method}", "Choose " + ", ".join(UNSTRUCTURED))
        cls = PRUNERS.config_class(method)
        extra = {"damp": req.damp} if method == "sparsegpt" else {}
        profile = req.profile if req.profile in ("uniform", "owl") else "file"
        cfg = cls(
            sparsity=0.5 if req.sparsity is None else req.sparsity, pattern=req.pattern,
            layers=req.layers, keep=list(req.keep), profile=profile, owl_m=req.owl_m,
            owl_lambda=req.owl_lambda, **calib, **extra,
        )  # fmt: skip
    cfg.validate()
    if hasattr(cfg, "compute_dtype"):
        from cllm.core.quantize.layerwise import resolve_compute_dtype

        cfg.compute_dtype = resolve_compute_dtype(cfg.compute_dtype)  # provenance records it
    return cfg


def config_params(cfg: Any) -> dict[str, Any]:
    """The config as recorded: a method that reads no calibration text is not identified by
    calibration options it ignores (so changing them does not redo its work)."""
    data = cfg.to_dict()
    if not cfg.needs_calibration():
        for name in (
            "calib",
            "calib_samples",
            "calib_seqlen",
            "seed",
            "batch_size",
            "compute_dtype",
        ):
            data.pop(name, None)
    return data


def _dequantize(cls: type, req: PruneRequest) -> dict[str, Any]:
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    return {"dequantize": req.dequantize} if "dequantize" in names else {}


class PruneJob(CalibratedJob):
    op = "prune"

    def __init__(self, req: PruneRequest) -> None:
        self.req = req
        self.cfg: Any = None
        self.calibration: Any = None
        self.layer_sparsity: list[float] | None = None

    def validate(self) -> None:
        self.cfg = prune_config(self.req)

    def outputs(self) -> list[OutputSpec]:
        return [OutputSpec(Kind.HF_FOLDER, "safetensors", "")]

    def prepare(self, source: Source, events: Events) -> dict[str, Any]:
        ckpt = require_checkpoint(source)
        cfg = self.cfg
        n_layers = int(ckpt.config.get("num_hidden_layers", 0))
        params: dict[str, Any] = {"method": PRUNERS.name_of(cfg), "config": config_params(cfg)}
        check_model = getattr(cfg, "check_model", None)
        if check_model is not None:  # shape-dependent refusals, before any work
            check_model(ckpt)
        already = stored_types(ckpt)
        if already:
            events.warn(
                f"{source.text} is already quantized ({', '.join(already)}); its weights are dequantized first"
            )
            params["input_dequantized_from"] = already
        if isinstance(cfg, UnstructuredScope):
            if cfg.layers is not None:
                parse_layers(cfg.layers, n_layers)
            if cfg.profile == "file":
                params["profile"] = self._profile_from_file(ckpt, n_layers)
        if cfg.needs_calibration():
            self.calibration = cfg.load_calibration(ckpt.tokenizer_dir())
            params["calibration_sha256"] = self.calibration.sha256
        return params

    def _profile_from_file(self, ckpt: Checkpoint, n_layers: int) -> dict[str, Any]:
        from cllm.core.prune.profile import sparsities_from_sensitivity

        path = Path(self.req.profile)
        try:
            raw = path.read_text()
            data = json.loads(raw)
            kld = data["kld"]
            params = data["layer_params"]
        except FileNotFoundError:
            raise UsageError(
                f"--profile {path}: no such file",
                "Use uniform, owl or a `cllm prune --sensitivity` JSON",
            ) from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(
                f"--profile {path} is not a prune sensitivity JSON ({type(exc).__name__}: {exc})",
                "Write one with cllm prune --sensitivity",
            ) from exc
        if data.get("columns") != list(SUBLAYERS) or len(kld) != n_layers:
            raise UsageError(
                f"--profile {path} does not map this model's {n_layers} layers x attention/mlp",
                "Measure it on this model with cllm prune --sensitivity",
            )
        self.layer_sparsity = sparsities_from_sensitivity(
            kld, params, self.cfg.sparsity, self.cfg.owl_lambda
        )
        return {
            "file_sha256": hashlib.sha256(raw.encode()).hexdigest(),
            "layer_sparsity": [round(s, 6) for s in self.layer_sparsity],
        }

    def run(
        self, source: Source, paths: list[Path], provenance: dict[str, Any], events: Events
    ) -> dict[str, Any]:
        from cllm.core.quantize.job import after_layer
        from cllm.formats.save import save_hf_folder

        ckpt = require_checkpoint(source)
        name = PRUNERS.name_of(self.cfg)
        events.log(f"pruning {source.text} with {describe(self.cfg, name)}")
        n_layers = int(ckpt.config.get("num_hidden_layers", 0))
        with events.progress("layers", n_layers) as advance:
            ctx = PruneContext(
                calibration=self.calibration, state_dir=state_dir(paths[0]),
                job_id=provenance["id"], provenance=provenance, resume=self.req.resume,
                on_layer=lambda i, n: after_layer(i, n, advance),
                layer_sparsity=self.layer_sparsity,
            )  # fmt: skip
            model = PRUNERS.handler_for(self.cfg)(ckpt, self.cfg, ctx)
        with events.progress("writing", len(model.plans)):
            save_hf_folder(
                paths[0], model.config, model.plans, ckpt.tokenizer_dir(), provenance,
                ckpt.gguf_kv,
            )  # fmt: skip
        if model.cleanup is not None:
            model.cleanup()
        summary = summarize(model.report)
        if summary:
            events.log(summary)
        return model.report


def describe(cfg: Any, name: str) -> str:
    if isinstance(cfg, UnstructuredScope):
        what = f"{cfg.pattern} pattern" if cfg.pattern else f"{cfg.sparsity:g} sparsity"
        profile = "" if cfg.profile == "uniform" else f", {cfg.profile} profile"
        return f"{name} at {what}{profile}"
    if name == "structured":
        return f"structured {cfg.target} pruning, ratio {cfg.ratio:g}"
    return f"depth pruning: {cfg.drop_layers} layers by {cfg.metric}"


def summarize(report: dict[str, Any]) -> str:
    parts = []
    if "sparsity" in report:
        parts.append(f"sparsity {float(report['sparsity']):.4f} over the pruned weights")
    if "params_before" in report and "params_after" in report:
        parts.append(f"parameters {report['params_before']:,} -> {report['params_after']:,}")
    if "dropped_layers" in report:
        parts.append("dropped layers " + ", ".join(str(i) for i in report["dropped_layers"]))
    return "; ".join(parts)


class PruneSensitivityJob(SensitivityMapJob):
    """KLD when only one sublayer (attention or MLP) of one layer is pruned with the chosen
    method and sparsity: what `--profile FILE` turns into per-layer sparsities."""

    def __init__(self, req: PruneRequest, output: Path | None) -> None:
        super().__init__(output)
        self.req = req
        self.cfg: Any = None

    def validate(self) -> None:
        if self.req.structured is not None or self.req.drop_layers is not None:
            raise UsageError(
                "--sensitivity measures --method pruning per layer",
                "Drop --structured / --drop-layers",
            )
        if self.req.profile != "uniform" or self.req.layers is not None:
            raise UsageError("--sensitivity measures every layer at a uniform sparsity")
        self.cfg = prune_config(self.req)
        if self.req.sensitivity_chunks < 1:
            raise UsageError("--sensitivity-chunks must be at least 1")

    def prepare(self, source: Source, events: Events) -> dict[str, Any]:
        ckpt = require_checkpoint(source)
        if stored_types(ckpt):
            events.warn(f"{source.text} is quantized; it is measured dequantized")
        return {
            "method": PRUNERS.name_of(self.cfg),
            "config": self.cfg.to_dict(),
            "chunks": self.req.sensitivity_chunks,
        }

    def measure(self, ckpt: Checkpoint, events: Events) -> Any:
        from cllm.core.prune.sensitivity import measure_prune_sensitivity
        from cllm.core.quantize.job import sensitivity_chunks

        data = sensitivity_chunks(ckpt, self.req.calib, self.req.sensitivity_chunks, self.req.seed)
        n_layers = int(ckpt.config.get("num_hidden_layers", 0))
        with events.progress("sensitivity", n_layers * len(SUBLAYERS)) as advance:
            report = measure_prune_sensitivity(
                ckpt, self.cfg, data, on_step=lambda _i, _n: advance()
            )
        report.protocol = {
            "text": str(self.req.calib or "default calibration"),
            "chunks": self.req.sensitivity_chunks,
            "ctx": 512,
            "seed": self.req.seed,
        }
        return report

    def heatmap(self, report: Any, path: Path) -> None:
        from cllm.core.heatmap import heatmap

        what = describe(self.cfg, PRUNERS.name_of(self.cfg))
        heatmap(
            report.kld,
            report.columns,
            "sublayer",
            f"KLD, one sublayer pruned ({what}; log10)",
            path,
        )
