"""The one pipeline every writing command runs (export, quantize, prune, sensitivity maps).

request -> validation -> input -> provenance id -> default output name -> --dry-run ->
reuse when up to date -> atomic write -> record.

A command's `Job` says what it validates, which outputs it writes, which parameters
identify the work and how to do it; `run_job` does the rest the same way for every
command, so the Make-friendly reuse rule, `--dry-run`, output refusal, leftover cleanup,
provenance and `--resume` cannot drift apart between commands. Core never prints: what
the user should see goes through an `Events` object the CLI supplies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cllm.formats.inputs import CHECKPOINT, Source, resolve_input
from cllm.formats.outputs import Kind, OutputCheck, check_output

Advance = Callable[..., None]


class Events(Protocol):
    def log(self, message: str, level: int = 0) -> None: ...
    def warn(self, message: str) -> None: ...
    def progress(self, description: str, total: int | None) -> AbstractContextManager[Advance]: ...


class Silent:
    """Events for Python callers: nothing shown."""

    def log(self, message: str, level: int = 0) -> None:
        pass

    def warn(self, message: str) -> None:
        pass

    @contextlib.contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[Advance]:
        yield lambda *a, **k: None


@dataclass(frozen=True)
class OutputSpec:
    kind: Kind
    fmt: str  # the NDJSON record's "format"
    suffix: str  # of the default name ("" for folders)
    beside: str | None = None  # a sibling of the first output: its path with this suffix
    role: str = "written"  # how an error names a sibling: "<path> (<role> beside -o <main>)"


@dataclass
class Artifact:
    path: Path
    fmt: str


@dataclass
class JobResult:
    status: str  # planned | reused | written
    op: str
    artifacts: list[Artifact]
    params: dict[str, Any]
    parent_sha256: str | None
    report: dict[str, Any] = field(default_factory=dict)


class Job:
    """One command's work. Subclasses set `op` and implement `outputs`, `prepare`, `run`."""

    op = "job"
    accepts: tuple[str, ...] = (CHECKPOINT,)

    def validate(self) -> None:
        """Flag checks that need no input: run before anything is read."""

    def outputs(self) -> list[OutputSpec]:
        raise NotImplementedError

    def prepare(self, source: Source, events: Events) -> dict[str, Any]:
        """The parameters that identify the output (recorded in provenance and hashed into
        its id). May read the input and calibration text, but does no heavy work: --dry-run
        stops right after it."""
        raise NotImplementedError

    def provenance_extras(self) -> dict[str, Any]:
        """calibration / seed for `make_provenance`."""
        return {}

    def saved_provenance(self, out: Path, pid: str) -> dict[str, Any] | None:
        """The provenance a killed run recorded (for --resume), if the job keeps state."""
        return None

    def run(
        self, source: Source, paths: list[Path], provenance: dict[str, Any], events: Events
    ) -> dict[str, Any]:
        raise NotImplementedError

    def default_name(self, source: Source, pid: str, suffix: str) -> Path:
        return default_output(source, self.op, pid, suffix)


class CalibratedJob(Job):
    """A job whose method may read calibration text and keep resumable layer state
    (quantize, prune): provenance records the calibration, and --resume reuses the
    provenance the killed run recorded so the resumed output is byte-identical."""

    calibration: Any = None  # cllm.core.calib.Calibration, set by prepare()

    def provenance_extras(self) -> dict[str, Any]:
        if self.calibration is None:
            return {}
        return {"calibration": self.calibration.to_provenance(), "seed": self.calibration.seed}

    def saved_provenance(self, out: Path, pid: str) -> dict[str, Any] | None:
        from cllm.core.quantize.store import saved_provenance

        return saved_provenance(state_dir(out), pid)


def default_output(source: Source, op: str, digest: str, ext: str) -> Path:
    """`<stem>.<op>-<hash>.<ext>` beside the input (in the current folder for an alias)."""
    if source.is_alias:
        return Path.cwd() / f"{source.text}.{op}-{digest[:8]}{ext}"
    stem = source.path.name
    for suffix in (".safetensors", ".gguf", ".onnx"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return source.path.parent / f"{stem}.{op}-{digest[:8]}{ext}"


def state_dir(out: Path) -> Path:
    """Where a layer-by-layer job keeps what --resume restarts from: a hidden folder beside
    its output, named after it."""
    out = Path(out)
    return out.parent / f".{out.name}.cllm-state"


def _paths(main: Path, specs: list[OutputSpec]) -> list[Path]:
    return [main if s.beside is None else main.with_suffix(s.beside) for s in specs]


def _labels(output: Path | None, paths: list[Path], specs: list[OutputSpec]) -> list[str | None]:
    """How a refused output is named in the error: the user's -o, or the file beside it."""
    if output is None:
        return [None] * len(paths)
    return [
        f"-o {output}" if s.beside is None else f"{p} ({s.role} beside -o {output})"
        for p, s in zip(paths, specs, strict=True)
    ]


def check_paths(output: Path, specs: list[OutputSpec]) -> list[OutputCheck]:
    paths = _paths(output, specs)
    return [
        check_output(p, s.kind, label)
        for p, s, label in zip(paths, specs, _labels(output, paths, specs), strict=True)
    ]


def run_job(
    job: Job,
    input_arg: str,
    *,
    output: Path | None = None,
    force: bool = False,
    dry_run: bool = False,
    resume: bool = False,
    events: Events | None = None,
) -> JobResult:
    from cllm.formats.leftovers import describe_leftover, remove_stale_temporaries
    from cllm.formats.provenance import make_provenance, provenance_id

    events = events or Silent()
    job.validate()
    specs = job.outputs()
    if output is not None:  # refused before the input is read or anything is measured
        check_paths(Path(output), specs)
    source = resolve_input(input_arg, accept=job.accepts)
    params = job.prepare(source, events)
    parent = source.sha256
    pid = provenance_id(parent, job.op, params)
    main = Path(output) if output is not None else job.default_name(source, pid, specs[0].suffix)
    checks = (
        check_paths(main, specs)
        if output is not None
        else [
            check_output(p, s.kind, None) for p, s in zip(_paths(main, specs), specs, strict=True)
        ]
    )
    artifacts = [Artifact(c.path, s.fmt) for c, s in zip(checks, specs, strict=True)]

    def result(status: str, report: dict[str, Any] | None = None) -> JobResult:
        return JobResult(status, job.op, artifacts, params, parent, report or {})

    if dry_run:
        return result("planned")
    for check in checks:
        for left in remove_stale_temporaries(check.path):
            events.warn(describe_leftover(left))
    redo = force or resume
    if not redo and all(check.up_to_date(pid) for check in checks):
        for check in checks:
            events.log(f"{check.path} is up to date (same input and parameters); --force redoes it")
        return result("reused")
    for check in checks:
        if output is None and check.exists and not check.up_to_date(pid):
            events.warn(f"{check.path} exists with other provenance; overwriting")
    saved = job.saved_provenance(main, pid) if resume else None
    prov = saved or make_provenance(
        job.op, params, parent, source.provenance, str(source.location), **job.provenance_extras()
    )
    report = job.run(source, [a.path for a in artifacts], prov, events)
    return result("written", report)
