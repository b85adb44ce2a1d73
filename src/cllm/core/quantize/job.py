"""`cllm quantize` as jobs of the shared pipeline (`cllm.core.job`): a quantized model, or a
per-layer sensitivity map (`--sensitivity`).

`QuantizeRequest` holds the command's flags as values; the jobs turn it into a method
config and a `Target`, refuse inconsistent combinations before any input is read, and do
the work. The CLI only builds the request and prints what comes back.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cllm.core.job import CalibratedJob, Events, Job, OutputSpec
from cllm.core.quantize.api import Target
from cllm.core.quantize.methods import AWQConfig, GPTQConfig, MethodConfig, RTNConfig
from cllm.core.quantize.registry import QUANTIZERS
from cllm.core.quantize.sparsity import SparseScan
from cllm.errors import UsageError
from cllm.formats.checkpoint import Checkpoint
from cllm.formats.inputs import Source, require_checkpoint
from cllm.formats.outputs import Kind, check_output

FLOAT_TYPES = {"F32", "F16", "BF16"}


@dataclass
class QuantizeRequest:
    method: str = "rtn"
    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    to: str | None = None  # safetensors | gguf; None: gguf if a GGUF type is given
    gguf_type: str | None = None
    fake: bool = False
    clip: bool | None = None  # None: on for GPTQ, off for RTN
    keep: list[str] = field(default_factory=list)
    calib: str | None = None
    calib_samples: int = 128
    calib_seqlen: int = 512
    seed: int = 0
    awq_then: str = "rtn"
    awq_grid: int = 20
    act_order: bool | None = None  # None: on wherever GPTQ runs
    damp: float = 0.01
    calib_dtype: str = "auto"
    resume: bool = False
    candidates: str = "Q4_0,Q5_0,Q8_0"
    sensitivity_chunks: int = 2
    sensitivity_file: str | None = None
    target_bpw: float | None = None
    target_size: str | None = None
    imatrix: str | None = None  # "auto" (from the calibration text) or a file
    imatrix_out: str | None = None  # also write the importance matrix here (GGUF or .dat)

    @property
    def mixed(self) -> bool:
        return self.target_bpw is not None or self.target_size is not None

    def candidate_types(self) -> list[str]:
        return [c.strip().upper() for c in self.candidates.split(",") if c.strip()]


def parse_size(text: str) -> int:
    """Bytes from '104857600', '100MB', '95.5M', '1G' (decimal units, as file sizes are shown)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMgG]?)[bB]?\s*", text)
    if not m:
        raise UsageError(
            f"--target-size {text!r} is not a size", "Use bytes or a number with K, M or G"
        )
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def method_config(req: QuantizeRequest) -> MethodConfig:
    """The method's config from the flags, refusing flags that do not apply to it."""
    if req.method not in QUANTIZERS:
        QUANTIZERS.config_class(req.method)  # raises with the list of methods
    if req.method != "awq" and (req.awq_then != "rtn" or req.awq_grid != 20):
        raise UsageError("--awq-then and --awq-grid apply to --method awq only")
    calib: dict[str, Any] = {
        "calib": req.calib,
        "calib_samples": req.calib_samples,
        "calib_seqlen": req.calib_seqlen,
        "seed": req.seed,
        "compute_dtype": req.calib_dtype,
    }
    cfg: MethodConfig
    if req.method == "rtn":
        if req.act_order is not None or req.resume:
            raise UsageError("--act-order and --resume apply to --method gptq or awq only")
        return RTNConfig(clip=bool(req.clip))
    from cllm.core.quantize.layerwise import resolve_compute_dtype

    # on wherever GPTQ runs: better at no cost in format or speed
    act_order = req.act_order if req.act_order is not None else (
        req.method == "gptq" or req.awq_then == "gptq"
    )  # fmt: skip
    if req.method == "awq":
        if req.clip is not None:
            raise UsageError(
                "--clip applies to --method rtn and gptq",
                "AWQ searches its own scales; use --method gptq --clip",
            )
        cfg = AWQConfig(grid_points=req.awq_grid, then=req.awq_then, act_order=act_order,
                        damp=req.damp, **calib)  # fmt: skip
    else:
        cfg = GPTQConfig(act_order=act_order, damp=req.damp, clip=req.clip is not False, **calib)
    cfg.validate()
    cfg.compute_dtype = resolve_compute_dtype(cfg.compute_dtype)  # provenance records what ran
    return cfg


def quantize_target(req: QuantizeRequest) -> Target:
    if req.target_bpw is not None and req.target_size is not None:
        raise UsageError("give --target-bpw or --target-size, not both")
    if req.mixed and (req.gguf_type or req.to == "safetensors"):
        raise UsageError(
            "--target-bpw/--target-size choose GGUF types per layer themselves",
            "Drop --gguf-type / --to safetensors",
        )
    to = req.to or ("gguf" if req.gguf_type or req.mixed else "safetensors")
    if to == "gguf" and not req.gguf_type and not req.mixed:
        raise UsageError("--to gguf needs --gguf-type", "e.g. --gguf-type Q4_K_M")
    if to == "safetensors" and req.gguf_type:
        raise UsageError("--gguf-type applies to --to gguf only")
    if req.fake and to == "gguf":
        raise UsageError("--fake applies to --to safetensors only")
    return Target(
        to=to, bits=req.bits, group_size=req.group_size, symmetric=req.symmetric,
        gguf_type=req.gguf_type.upper() if req.gguf_type else None, fake=req.fake,
        keep=list(req.keep),
    )  # fmt: skip


def stored_types(ckpt: Checkpoint) -> list[str]:
    """The non-float storage types of a checkpoint (it is already quantized if any)."""
    return sorted({i.dtype for i in ckpt.tensor_infos().values()} - FLOAT_TYPES)


class QuantizeJob(CalibratedJob):
    op = "quantize"

    def __init__(self, req: QuantizeRequest) -> None:
        self.req = req
        self.cfg: MethodConfig | None = None
        self.target = Target()
        self.calibration: Any = None
        self.sensitivity_file: dict[str, Any] | None = None
        self.sparse: SparseScan | None = None
        self.importance: ImatrixSource | None = None

    def validate(self) -> None:
        self.target = quantize_target(self.req)
        self.cfg = method_config(self.req)
        check_imatrix_flags(self.req, self.target, self.cfg)
        if self.req.target_size is not None:
            parse_size(self.req.target_size)
        if not self.req.mixed:
            self.target.grid(self.cfg)  # validates the grid flags before heavy work
        else:
            from cllm.core.quantize.sensitivity import check_candidates

            check_candidates(self.req.candidate_types(), mixed=True)

    def outputs(self) -> list[OutputSpec]:
        if self.target.to == "gguf":
            return [OutputSpec(Kind.GGUF, "gguf", ".gguf")]
        return [OutputSpec(Kind.HF_FOLDER, "safetensors", "")]

    def prepare(self, source: Source, events: Events) -> dict[str, Any]:
        assert self.cfg is not None
        ckpt = require_checkpoint(source)
        params: dict[str, Any] = {"method": self.cfg.to_dict(), "target": self.target.to_dict()}
        already = stored_types(ckpt)
        if already:
            events.warn(
                f"{source.text} is already quantized ({', '.join(already)}); its weights are dequantized first"
            )
            params["input_dequantized_from"] = already
        self._check_sparse_input(source, ckpt, params, events)
        if self.req.imatrix or self.req.imatrix_out:
            self.importance = ImatrixSource(self.req)
            params["imatrix"] = self.importance.identity(ckpt)
            self.calibration = self.importance.calibration
        if self.cfg.needs_calibration():
            self.calibration = self.cfg.load_calibration(ckpt.tokenizer_dir())  # type: ignore[union-attr]
            params["calibration_sha256"] = self.calibration.sha256
        if self.req.mixed:
            params["mixed"] = {
                "sensitivity": self._sensitivity_identity(ckpt),
                "target_bpw": self.req.target_bpw,
                "target_size": parse_size(self.req.target_size) if self.req.target_size else None,
            }
        return params

    def _check_sparse_input(
        self, source: Source, ckpt: Checkpoint, params: dict[str, Any], events: Events
    ) -> None:
        """A pruned input (exact zeros in the weights to quantize) is recorded in the
        parameters, and a type that cannot keep its zeros is named before any work: the
        output would look fine and quietly be a dense model again."""
        from cllm.core.quantize.methods import select_tensors
        from cllm.core.quantize.sparsity import SUGGESTED_TYPES, scan_sparse

        self.sparse = scan_sparse(ckpt, select_tensors(ckpt, self.target.keep))
        if not self.sparse.any:
            return
        losing = self._zero_losing_types()
        params["sparse_input"] = self.sparse.to_dict() | {"type_keeps_zeros": not losing}
        what = (
            f"{source.text} is sparse ({len(self.sparse.sparse)} of {self.sparse.tensors} "
            f"weights to quantize, {self.sparse.sparsity:.1%} exact zeros)"
        )
        if losing:
            events.warn(
                f"{what}, but {'/'.join(losing)} cannot keep exact zeros: the pruned weights "
                "would come back as small nonzero values, a dense model again. "
                f"Use {SUGGESTED_TYPES} to keep them"
            )
        else:
            held = " (GPTQ holds the mask)" if self._runs_gptq() else ""
            events.log(f"{what}: its zeros stay exactly zero{held}")

    def _runs_gptq(self) -> bool:
        return self.req.method == "gptq" or (
            self.req.method == "awq" and self.req.awq_then == "gptq"
        )

    def _zero_losing_types(self) -> list[str]:
        """The requested types (one, or mixed precision's candidates) without an exact zero."""
        from cllm.core.quantize.sparsity import holds_exact_zero

        if self.target.to != "gguf":
            return []  # int grids keep zeros, symmetric or not
        types = self.req.candidate_types() if self.req.mixed else [str(self.target.gguf_type)]
        return [t for t in types if not holds_exact_zero(t)]

    def _sensitivity_identity(self, ckpt: Checkpoint) -> dict[str, Any]:
        """What the per-layer plan will be made from: a given sensitivity file (by hash), or
        a measurement with these settings (deterministic, so --dry-run need not run it)."""
        if self.req.sensitivity_file is None:
            return sensitivity_params(self.req)
        from cllm.core.quantize.sensitivity import SensitivityReport

        path = Path(self.req.sensitivity_file)
        try:
            raw = path.read_text()
            report = SensitivityReport.from_dict(json.loads(raw))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"cannot read sensitivity file {path}: {exc}") from exc
        n_layers = int(ckpt.config.get("num_hidden_layers", 0))
        if report.layers != n_layers:
            raise UsageError(f"{path} measures {report.layers} layers, the model has {n_layers}")
        sha = hashlib.sha256(raw.encode()).hexdigest()
        self.sensitivity_file = {"report": report, "sha256": sha}
        return {"file_sha256": sha}

    def run(
        self, source: Source, paths: list[Path], provenance: dict[str, Any], events: Events
    ) -> dict[str, Any]:
        from cllm.core.quantize.api import quantize

        assert self.cfg is not None
        ckpt = require_checkpoint(source)
        target = self.target
        if self.req.mixed:
            plan = self._plan_mixed(ckpt, events)
            # the plan itself is recorded (not hashed: the id names the settings it came from)
            params = provenance["params"]
            provenance["params"] = {**params, "mixed": {**params["mixed"], **plan}}
        grid = None if target.layer_types is not None else target.grid(self.cfg)
        method = self.req.method.upper()
        label = method + (
            " then GPTQ" if self.req.method == "awq" and self.req.awq_then == "gptq" else ""
        )
        where = (
            grid.describe() if grid else "mixed GGUF types" if target.layer_types else "llama.cpp " + str(target.gguf_type)
        )  # fmt: skip
        imatrix = None
        if self.importance is not None:
            imatrix = self.importance.get(ckpt, provenance, events)
            where += " with an importance matrix"
        events.log(f"quantizing {source.text} with {label} on {where}")
        layered = self.cfg.needs_calibration()
        n_layers = int(ckpt.config.get("num_hidden_layers", 0))
        with events.progress(
            "layers" if layered else "tensors", n_layers if layered else None
        ) as advance:
            report = quantize(
                ckpt, self.cfg, target, paths[0], provenance, resume=self.req.resume,
                progress=(lambda _n: advance()) if not layered else None,
                on_layer=lambda i, n: after_layer(i, n, advance),
                calibration=self.calibration, imatrix=imatrix,
            )  # fmt: skip
        if imatrix is not None:
            report["imatrix"] = imatrix.summary()
        if report.get("note"):
            events.warn(str(report["note"]))
        if self.sparse is not None and self.sparse.any:
            report["sparse_tensors"] = len(self.sparse.sparse)
            report["sparsity_kept"] = self._zeros_kept(paths[0], events)
        types = report.get("types")
        if types:
            events.log(
                "tensor types: "
                + ", ".join(f"{k} {v}" for k, v in sorted(types.items(), key=lambda kv: -kv[1]))
            )
            gt = target.gguf_type
            if gt and gt not in types and gt[:2] not in "".join(types):
                events.warn(
                    f"llama.cpp used no {gt} tensor (row lengths of {ckpt.config.get('hidden_size')} force fallbacks)"
                )
        return report

    def _zeros_kept(self, out: Path, events: Events) -> bool:
        """Whether the written output keeps every zero of the pruned weights, judged by the
        types it stores them in: llama.cpp's K-quant recipes fall back to legacy types
        (which keep zeros) where rows are not multiples of 256, so a GGUF is read back."""
        from cllm.core.quantize.sparsity import holds_exact_zero

        assert self.sparse is not None
        if self.target.to != "gguf":
            return True
        from cllm.formats.checkpoint import open_checkpoint

        out_ckpt = open_checkpoint(out)
        try:
            infos = out_ckpt.tensor_infos()
            stored = sorted({infos[n].dtype for n in self.sparse.sparse if n in infos})
        finally:
            out_ckpt.close()
        if not stored:  # names not found in the output: trust the requested types
            return not self._zero_losing_types()
        kept = all(holds_exact_zero(t) for t in stored)
        if kept and self._zero_losing_types():
            events.log(
                f"the pruned weights were stored as {'/'.join(stored)} (llama.cpp's fallback "
                "for these row widths, or the types mixed precision chose), which keep the zeros"
            )
        return kept

    def _plan_mixed(self, ckpt: Checkpoint, events: Events) -> dict[str, Any]:
        from cllm.core.quantize.api import plan_layer_types
        from cllm.core.quantize.methods import select_tensors

        if self.sensitivity_file is not None:
            report, sha = self.sensitivity_file["report"], self.sensitivity_file["sha256"]
        else:
            events.log(
                "measuring per-layer sensitivity (use --sensitivity once and --sensitivity-file to reuse it)"
            )
            report = measure(ckpt, self.req, events)
            sha = hashlib.sha256(json.dumps(report.to_dict(), sort_keys=True).encode()).hexdigest()
        size = parse_size(self.req.target_size) if self.req.target_size else None
        names = select_tensors(ckpt, self.target.keep)
        types, stats = plan_layer_types(report, ckpt, names, self.req.target_bpw, size)
        self.target.layer_types = types
        events.log(
            f"mixed precision at {stats['bits_per_weight']:.3f} bits/weight: "
            + ", ".join(f"{t} x{types.count(t)}" for t in sorted(set(types)))
        )
        # the map itself (a few hundred numbers) rides along, so `cllm report` can draw the
        # heat map a mixed-precision model was planned from, from the model alone
        sens_map = {"candidates": report.candidates, "kld": report.kld, "layers": report.layers}
        return {
            "sensitivity_sha256": sha,
            "layer_types": types,
            "sensitivity_map": sens_map,
            **stats,
        }


def check_imatrix_flags(req: QuantizeRequest, target: Target, cfg: MethodConfig) -> None:
    """An importance matrix weights llama.cpp's own quantizer; refused where it would be
    ignored, before anything is read."""
    from cllm.core.quantize.api import NEEDS_IMATRIX

    if target.gguf_type in NEEDS_IMATRIX and req.imatrix is None:
        raise UsageError(
            f"llama.cpp's {target.gguf_type} needs an importance matrix",
            "Add --imatrix auto (or a llama.cpp imatrix file)",
        )
    if req.imatrix is None and req.imatrix_out is None:
        return
    if req.imatrix_out is not None and req.imatrix not in (None, "auto"):
        raise UsageError(
            "--imatrix-out writes the matrix cllm computes",
            "Drop --imatrix FILE, or --imatrix-out (the file is already one)",
        )
    if req.imatrix is not None and (
        target.to != "gguf" or req.mixed or not isinstance(cfg, RTNConfig) or cfg.clip
    ):
        raise UsageError(
            "--imatrix weights llama.cpp's quantizer: it applies to --gguf-type with --method rtn",
            "e.g. cllm quantize MODEL --gguf-type Q4_K_M --imatrix auto",
        )
    if req.imatrix_out is not None:
        check_output(Path(req.imatrix_out), Kind.IMATRIX, f"--imatrix-out {req.imatrix_out}")


class ImatrixSource:
    """Where the importance matrix comes from (computed from calibration text, or a file),
    what identifies it in the output's provenance, and the matrix itself."""

    def __init__(self, req: QuantizeRequest) -> None:
        self.req = req
        self.calibration: Any = None
        self.matrix: Any = None

    def identity(self, ckpt: Checkpoint) -> dict[str, Any]:
        if self.req.imatrix not in (None, "auto"):
            from cllm.core.quantize.imatrix import load_imatrix

            self.matrix = load_imatrix(str(self.req.imatrix))
            s = self.matrix.summary()
            return {"source": "file", "sha256": s["sha256"], "entries": s["entries"]}
        from cllm.core.calib import CalibrationOptions

        opts = CalibrationOptions(
            calib=self.req.calib, calib_samples=self.req.calib_samples,
            calib_seqlen=self.req.calib_seqlen, seed=self.req.seed,
            compute_dtype=self.req.calib_dtype,
        )  # fmt: skip
        opts.check_calibration()
        self.calibration = opts.load_calibration(ckpt.tokenizer_dir())
        return {"source": "auto", "calibration_sha256": self.calibration.sha256}

    def get(self, ckpt: Checkpoint, provenance: dict[str, Any], events: Events) -> Any:
        """The matrix, computed now for `auto`; also written to --imatrix-out."""
        if self.matrix is None:
            from cllm.core.quantize.imatrix import collect_imatrix

            n = int(ckpt.config.get("num_hidden_layers", 0))
            events.log(
                f"importance matrix: {self.calibration.ids.shape[0]} samples of "
                f"{self.calibration.ids.shape[1]} tokens through {n} layers"
            )
            with events.progress("importance matrix", n) as advance:
                self.matrix = collect_imatrix(
                    ckpt, self.calibration, compute_dtype=self.req.calib_dtype,
                    on_layer=lambda i, n: advance(),
                )  # fmt: skip
        if self.req.imatrix_out is not None:
            write_imatrix_file(self.matrix, Path(self.req.imatrix_out), provenance)
            events.log(f"importance matrix written to {self.req.imatrix_out}")
        return self.matrix


def write_imatrix_file(matrix: Any, path: Path, provenance: dict[str, Any]) -> None:
    from cllm.formats.atomic import atomic_path
    from cllm.formats.imatrix import write_imatrix

    matrix.provenance = provenance
    with atomic_path(path, Kind.IMATRIX) as tmp:
        write_imatrix(matrix, tmp, legacy=path.suffix.lower() == ".dat")


class ImatrixJob(CalibratedJob):
    """`cllm quantize MODEL --imatrix-out FILE` without a target type: the importance
    matrix alone, for llama.cpp's llama-quantize or a later `cllm quantize --imatrix FILE`."""

    op = "imatrix"

    def __init__(self, req: QuantizeRequest) -> None:
        self.req = req
        self.source = ImatrixSource(req)

    def validate(self) -> None:
        if self.req.imatrix not in (None, "auto"):
            raise UsageError("--imatrix-out alone computes a matrix; drop --imatrix FILE")

    def outputs(self) -> list[OutputSpec]:
        return [OutputSpec(Kind.IMATRIX, "imatrix", ".imatrix.gguf")]

    def prepare(self, source: Source, events: Events) -> dict[str, Any]:
        ckpt = require_checkpoint(source)
        params = {"imatrix": self.source.identity(ckpt)}
        self.calibration = self.source.calibration
        return params

    def run(
        self, source: Source, paths: list[Path], provenance: dict[str, Any], events: Events
    ) -> dict[str, Any]:
        ckpt = require_checkpoint(source)
        self.req.imatrix_out = None  # written here, to the job's own output path
        matrix = self.source.get(ckpt, provenance, events)
        write_imatrix_file(matrix, paths[0], provenance)
        return {"imatrix": matrix.summary(), "format": "imatrix"}


def choose_job(req: QuantizeRequest, output: Path | None) -> tuple[Job, Path | None]:
    """A quantized model, or (--imatrix-out with no target type) the importance matrix
    alone, which is then the run's output."""
    if req.imatrix_out is None or req.gguf_type or req.mixed or req.to:
        return QuantizeJob(req), output
    if output is not None:
        raise UsageError(
            "--imatrix-out without --gguf-type writes only the matrix; -o has nothing to name",
            "Drop -o, or add --gguf-type",
        )
    return ImatrixJob(req), Path(req.imatrix_out)


def after_layer(i: int, n: int, advance: Any) -> None:
    """Progress after each finished layer, and the test hook of the --resume tests: die like a
    killed process once layer i is saved."""
    import os
    import signal

    advance(description=f"layer {i + 1}/{n}")
    if os.environ.get("CLLM_TEST_KILL_AFTER_LAYER") == str(i):
        os.kill(os.getpid(), signal.SIGKILL)


def sensitivity_params(req: QuantizeRequest) -> dict[str, Any]:
    return {
        "candidates": req.candidate_types(),
        "chunks": req.sensitivity_chunks,
        "calib": req.calib,
        "seed": req.seed,
    }


def sensitivity_chunks(ckpt: Checkpoint, calib: str | None, chunks: int, seed: int) -> list[Any]:
    """512-token windows of calibration text (never the evaluation text, which would leak)."""
    from cllm.core.calib import CalibrationOptions

    opts = CalibrationOptions(calib=calib, calib_samples=chunks, calib_seqlen=512, seed=seed)
    return [row.numpy() for row in opts.load_calibration(ckpt.tokenizer_dir()).ids]


def measure(ckpt: Checkpoint, req: QuantizeRequest, events: Events) -> Any:
    from cllm.core.quantize.sensitivity import measure_sensitivity

    cands = req.candidate_types()
    data = sensitivity_chunks(ckpt, req.calib, req.sensitivity_chunks, req.seed)
    n_layers = int(ckpt.config.get("num_hidden_layers", 0))
    with events.progress("sensitivity", n_layers * len(cands)) as advance:
        report = measure_sensitivity(ckpt, data, cands, on_step=lambda _i, _n: advance())
    report.protocol = {
        "text": str(req.calib or "default calibration"),
        "chunks": req.sensitivity_chunks,
        "ctx": 512,
        "seed": req.seed,
    }
    return report


class SensitivityMapJob(Job):
    """A JSON report and its heat map PNG beside it; both carry provenance, so a re-run with
    the same input and parameters reuses them and a later run knows they are cllm's to
    replace. Subclasses say what is measured (`params`, `measure`, `heatmap`)."""

    op = "sensitivity"

    def __init__(self, output: Path | None) -> None:
        if output is not None and Path(output).with_suffix(".png") == Path(output):
            raise UsageError(
                f"-o {output}: --sensitivity writes a JSON report there and its heat map beside it as .png",
                "Give the JSON's name, e.g. -o sens.json",
            )

    def outputs(self) -> list[OutputSpec]:
        return [
            OutputSpec(Kind.SENSITIVITY_JSON, "json", ".json"),
            OutputSpec(Kind.HEATMAP_PNG, "png", ".json", beside=".png", role="the heat map"),
        ]

    def measure(self, ckpt: Checkpoint, events: Events) -> Any:
        raise NotImplementedError

    def heatmap(self, report: Any, path: Path) -> None:
        raise NotImplementedError

    def run(
        self, source: Source, paths: list[Path], provenance: dict[str, Any], events: Events
    ) -> dict[str, Any]:
        from cllm.formats.atomic import atomic_path
        from cllm.formats.outputs import mark_png

        ckpt = require_checkpoint(source)
        report = self.measure(ckpt, events)
        data = {
            **report.to_dict(),
            "model_sha256": ckpt.sha256,
            "params": provenance["params"],
            "provenance": provenance,
        }
        out, png = paths
        with atomic_path(out, Kind.SENSITIVITY_JSON) as tmp:
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        with atomic_path(png, Kind.HEATMAP_PNG) as tmp:
            self.heatmap(report, tmp)
            mark_png(tmp, provenance)
        return {"report": report.to_dict()}


class QuantSensitivityJob(SensitivityMapJob):
    """Per-layer KLD at each candidate GGUF type (what mixed precision allocates from)."""

    def __init__(self, req: QuantizeRequest, output: Path | None) -> None:
        super().__init__(output)
        self.req = req

    def validate(self) -> None:
        from cllm.core.quantize.sensitivity import check_candidates

        check_candidates(self.req.candidate_types())

    def prepare(self, source: Source, events: Events) -> dict[str, Any]:
        require_checkpoint(source)
        return sensitivity_params(self.req)

    def measure(self, ckpt: Checkpoint, events: Events) -> Any:
        return measure(ckpt, self.req, events)

    def heatmap(self, report: Any, path: Path) -> None:
        from cllm.core.quantize.sensitivity import heatmap_png

        heatmap_png(report, path)
