"""`cllm export` as jobs of the shared pipeline: a checkpoint in another format, or an edge
bundle (which also takes an ONNX export as input)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cllm.core.export import ExportConfig, export
from cllm.core.job import Events, Job, OutputSpec
from cllm.formats.inputs import CHECKPOINT, ONNX, Source, require_checkpoint
from cllm.formats.outputs import Kind


def export_kind(cfg: Any) -> Kind:
    """The kind of output a config writes: what an existing output at -o must be to be replaced."""
    to = cfg.to_dict()["to"]
    if to == "safetensors":
        return Kind.SAFETENSORS_FILE if cfg.single_file else Kind.HF_FOLDER
    return {"gguf": Kind.GGUF, "onnx": Kind.ONNX, "bundle": Kind.BUNDLE}[to]


class ExportJob(Job):
    op = "export"

    def __init__(self, cfg: ExportConfig) -> None:
        self.cfg = cfg

    def validate(self) -> None:
        self.cfg.validate()

    def outputs(self) -> list[OutputSpec]:
        return [OutputSpec(export_kind(self.cfg), self.cfg.to_dict()["to"], self.cfg.extension)]

    def prepare(self, source: Source, events: Events) -> dict[str, Any]:
        require_checkpoint(source)
        return self.cfg.to_dict()

    def run(
        self, source: Source, paths: list[Path], provenance: dict[str, Any], events: Events
    ) -> dict[str, Any]:
        ckpt = require_checkpoint(source)
        to = self.cfg.to_dict()["to"]
        n = 1 if to == "onnx" else len(ckpt.tensor_infos())
        with events.progress(f"export to {to}", n) as advance:
            report = export(ckpt, self.cfg, paths[0], provenance, progress=lambda _n: advance())
        types = report.get("types") or {}
        gguf_type = getattr(self.cfg, "gguf_type", None)
        if to == "gguf" and types:
            fallback = {k: v for k, v in types.items() if k not in (gguf_type, "F32")}
            if fallback:
                events.warn(
                    f"some tensors could not use {gguf_type} (row length not a multiple of its block): {fallback}"
                )
            events.log("tensor types: " + ", ".join(f"{k} {v}" for k, v in types.items()), level=1)
        return report


class BundleJob(Job):
    op = "export"
    accepts = (CHECKPOINT, ONNX)

    def __init__(self, cfg: Any) -> None:  # BundleExportConfig
        self.cfg = cfg

    def validate(self) -> None:
        self.cfg.validate()

    def outputs(self) -> list[OutputSpec]:
        return [OutputSpec(Kind.BUNDLE, "bundle", self.cfg.extension)]

    def prepare(self, source: Source, events: Events) -> dict[str, Any]:
        from cllm.core.bundle import check_expressible

        check_expressible(source.checkpoint, self.cfg)  # before any work
        return self.cfg.to_dict()

    def run(
        self, source: Source, paths: list[Path], provenance: dict[str, Any], events: Events
    ) -> dict[str, Any]:
        from cllm.core.bundle import write_bundle

        with events.progress(f"bundle for {self.cfg.target}", None):
            report = write_bundle(
                source.checkpoint, Path(source.location), self.cfg, paths[0], provenance
            )
        events.log(
            f"bundle: {report['model']} for {report['runtime']} on {self.cfg.target}; run it with sh run.sh"
        )
        return report
