"""Reading what `cllm report` is given, all of it, before anything is drawn or written.

An input is a stream of JSON values: NDJSON from `cllm eval --json` (schema `cllm.eval/1`)
and `cllm bench --json` (`cllm.bench/1`), or one sensitivity report as `cllm quantize
--sensitivity` / `cllm prune --sensitivity` write it (pretty-printed JSON with `kld` and
`candidates` or `columns`). A value that is not JSON, not an object, or not one of those is
refused with its file and line, as is a field of the wrong type and an input with nothing in
it.

Records of one model are then put together:

- eval records of the same model file on the same backend are merged (a perplexity run and a
  `--tasks` run of one model are one candidate);
- each bench record joins the eval candidate it measured: on sha256 when both records carry
  one, otherwise on the resolved path, otherwise on the name the user gave. A bench record
  that joins nothing is a candidate of its own (size and speed, no quality numbers).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cllm.core.records import BENCH_SCHEMA, EVAL_SCHEMA, SCHEMAS
from cllm.errors import InputError

HINT = (
    "Give NDJSON from 'cllm eval --json' or 'cllm bench --json', "
    "or a sensitivity JSON from 'cllm quantize/prune --sensitivity'"
)
STDIN = "-"
_WS = re.compile(r"\s*")


@dataclass(frozen=True)
class InputFile:
    """One input as the user named it, and what it held (for the report's id)."""

    name: str
    sha256: str
    bytes: int


@dataclass
class SensitivityMap:
    """A layers x columns KLD map to draw as a heat map."""

    name: str  # file-name part: heatmap-<name>.png
    source: str  # where it came from, as index.md names it
    kld: list[list[float]]
    columns: list[str]
    xlabel: str
    title: str


@dataclass
class Candidate:
    """One model on one backend: the eval records merged, the bench records joined."""

    name: str
    where: str  # file:line of its first record
    bytes: int
    path: str | None = None
    format: str | None = None
    backend: str | None = None
    params: int | None = None
    bits_per_weight: float | None = None
    sha256: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    perplexity: float | None = None
    perplexity_se: float | None = None
    kld: dict[str, Any] | None = None
    base_perplexity: float | None = None
    protocol: dict[str, Any] = field(default_factory=dict)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    task_protocol: dict[str, Any] = field(default_factory=dict)
    sensitivity: dict[str, Any] | None = None
    bench: list[dict[str, Any]] = field(default_factory=list)
    evaluated: bool = True  # False: a bench record that joined no eval record

    @property
    def speed(self) -> dict[str, Any] | None:
        """The bench record this row shows: the one on the eval backend, else the first."""
        same = [b for b in self.bench if b.get("backend") == self.backend]
        pick = same or self.bench
        return pick[0] if pick else None

    @property
    def label(self) -> str:
        label = self.provenance.get("label")
        return label if isinstance(label, str) and label else "base"

    @property
    def has_steps(self) -> bool:
        return bool(self.provenance.get("steps"))


@dataclass
class Inputs:
    files: list[InputFile]
    candidates: list[Candidate]
    maps: list[SensitivityMap]
    notes: list[str]  # what index.md and stderr should say about the joining
    n_eval: int = 0
    n_bench: int = 0


# -- reading -----------------------------------------------------------------------------


def read_text(name: str, stdin: str | None) -> tuple[str, bytes]:
    """The text of one input (`-`: what the CLI read from stdin)."""
    if name == STDIN:
        if stdin is None:
            raise InputError("'-' was given but nothing was read from stdin", HINT)
        return stdin, stdin.encode()
    path = Path(name)
    if path.is_dir():
        raise InputError(f"{name} is a folder", HINT)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{name}: no such file", HINT) from None
    except OSError as exc:
        raise InputError(f"{name}: cannot read it ({exc.strerror or exc})", HINT) from None
    try:
        return data.decode("utf-8"), data
    except UnicodeDecodeError:
        raise InputError(f"{name}: not UTF-8 text (a binary file?)", HINT) from None


def json_values(text: str, name: str) -> list[tuple[int, Any]]:
    """(line, value) for each JSON value in `text`: NDJSON, or one pretty-printed document."""
    dec = json.JSONDecoder()
    out: list[tuple[int, Any]] = []
    pos, line, counted = 0, 1, 0
    if text.startswith("\ufeff"):
        pos = counted = 1
    while True:
        m = _WS.match(text, pos)
        pos = m.end() if m else pos
        if pos >= len(text):
            return out
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            value, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            at = f", line {exc.lineno} column {exc.colno}" if exc.lineno != line else ""
            raise InputError(f"{name}:{line}: not JSON ({exc.msg}{at})", HINT) from None
        out.append((line, value))


def load_inputs(names: list[str], stdin: str | None = None) -> Inputs:
    """Read and check every input; merge and join the records. Raises InputError (exit 2)
    naming the file and line of the first thing that is not a cllm record."""
    if not names:
        raise InputError("no input files", HINT)
    if names.count(STDIN) > 1:
        raise InputError("'-' (stdin) can be given only once", "Pass the other inputs as files")
    files: list[InputFile] = []
    evals: list[Candidate] = []
    benches: list[tuple[str, dict[str, Any]]] = []
    maps: list[SensitivityMap] = []
    for name in names:
        text, data = read_text(name, stdin)
        shown = "<stdin>" if name == STDIN else name
        files.append(InputFile(shown, hashlib.sha256(data).hexdigest(), len(data)))
        values = json_values(text, shown)
        if not values:
            raise InputError(f"{shown} is empty: no records in it", HINT)
        for line, value in values:
            where = f"{shown}:{line}"
            if not isinstance(value, dict):
                raise InputError(f"{where}: {_json_type(value)}, not a cllm record", HINT)
            schema = value.get("schema")
            if schema == EVAL_SCHEMA:
                evals.append(eval_candidate(value, where))
            elif schema == BENCH_SCHEMA:
                check_bench(value, where)
                benches.append((where, value))
            elif schema is not None:
                if isinstance(schema, str) and schema.split("/")[0] in {
                    s.split("/")[0] for s in SCHEMAS
                }:
                    raise InputError(
                        f"{where}: schema {schema!r} is a version this cllm does not read "
                        f"(it reads {' and '.join(SCHEMAS)})",
                        "Use the cllm that wrote it, or re-run that command with this one",
                    )
                raise InputError(f"{where}: schema {schema!r} is not a cllm record", HINT)
            elif is_sensitivity(value):
                maps.append(sensitivity_map(value, where, _stem(shown)))
            else:
                raise InputError(f'{where}: not a cllm record (no "schema" field)', HINT)
    notes: list[str] = []
    candidates = merge_evals(evals, notes)
    for c in candidates:
        if c.sensitivity is not None:
            maps.append(sensitivity_map(c.sensitivity, c.where, _stem(c.name), c.name))
    join_bench(candidates, benches, notes)
    _unique_map_names(maps)
    return Inputs(files, candidates, maps, notes, len(evals), len(benches))


# -- checking one record -------------------------------------------------------------------


def _json_type(value: Any) -> str:
    """'a string', 'an array', ...: how an error names what it found."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


class _Fields:
    """Typed access to a record's fields; a wrong type is one error naming file:line."""

    def __init__(self, obj: dict[str, Any], where: str, prefix: str = "") -> None:
        self.obj, self.where, self.prefix = obj, where, prefix

    def _bad(self, key: str, want: str) -> InputError:
        got = _json_type(self.obj.get(key))
        return InputError(f'{self.where}: field "{self.prefix}{key}" is {got}, not {want}', HINT)

    def _missing(self, key: str) -> InputError:
        return InputError(f'{self.where}: field "{self.prefix}{key}" is missing', HINT)

    def num(self, key: str, required: bool = False) -> float | None:
        v = self.obj.get(key)
        if v is None:
            if required:
                raise self._missing(key)
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self._bad(key, "a number")
        return float(v)

    def int_(self, key: str, required: bool = False) -> int | None:
        v = self.obj.get(key)
        if v is None:
            if required:
                raise self._missing(key)
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            if isinstance(v, int) and not isinstance(v, bool):
                raise InputError(f'{self.where}: field "{self.prefix}{key}" is negative', HINT)
            raise self._bad(key, "a whole number")
        return v

    def str_(self, key: str, required: bool = False) -> str | None:
        v = self.obj.get(key)
        if v is None:
            if required:
                raise self._missing(key)
            return None
        if not isinstance(v, str):
            raise self._bad(key, "a string")
        return v

    def dict_(self, key: str) -> dict[str, Any] | None:
        v = self.obj.get(key)
        if v is None:
            return None
        if not isinstance(v, dict):
            raise self._bad(key, "an object")
        return v

    def sub(self, key: str) -> _Fields | None:
        d = self.dict_(key)
        return None if d is None else _Fields(d, self.where, f"{self.prefix}{key}.")


_KLD_FIELDS = ("mean", "mean_se", "median", "p90", "p99", "max", "top1_agreement")
_SUMMARY_FIELDS = ("median", "min", "max")


def eval_candidate(obj: dict[str, Any], where: str) -> Candidate:
    f = _Fields(obj, where)
    name = f.str_("name") or f.str_("path")
    if not name:
        raise f._missing("name")
    c = Candidate(
        name=name,
        where=where,
        bytes=f.int_("bytes", required=True) or 0,
        path=f.str_("path"),
        format=f.str_("format"),
        backend=f.str_("backend"),
        params=f.int_("params"),
        bits_per_weight=f.num("bits_per_weight"),
        sha256=f.str_("sha256"),
        provenance=f.dict_("provenance") or {},
        perplexity=f.num("perplexity"),
        perplexity_se=f.num("perplexity_se"),
        base_perplexity=f.num("base_perplexity"),
        protocol=f.dict_("protocol") or {},
    )
    kld = f.sub("kld")
    if kld is not None:
        kld.num("mean", required=True)
        for key in _KLD_FIELDS[1:]:
            kld.num(key)
        kld.str_("base")
        kld.str_("base_sha256")
        c.kld = dict(kld.obj)
    tasks = f.dict_("tasks") or {}
    for task, metrics in tasks.items():
        if not isinstance(metrics, dict):
            raise InputError(
                f'{where}: field "tasks.{task}" is {_json_type(metrics)}, not an object', HINT
            )
        tf = _Fields(metrics, where, f"tasks.{task}.")
        for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
            tf.num(key)
        c.tasks[task] = dict(metrics)
    for key in ("task_protocol", "tasks_protocol"):
        c.task_protocol = c.task_protocol or (f.dict_(key) or {})
    if not c.task_protocol and c.tasks:  # lm-eval's settings, wherever the record keeps them
        c.task_protocol = _holding(c.protocol, "lm_eval") or {}
    c.sensitivity = f.dict_("sensitivity")
    if c.sensitivity is not None and not is_sensitivity(c.sensitivity):
        raise InputError(
            f'{where}: field "sensitivity" is not a sensitivity report (no "kld" with '
            '"candidates" or "columns")',
            HINT,
        )
    return c


def _holding(d: dict[str, Any], key: str, depth: int = 3) -> dict[str, Any] | None:
    """The (nested) dict of `d` that has `key`."""
    if key in d:
        return d
    if depth:
        for v in d.values():
            if isinstance(v, dict) and (found := _holding(v, key, depth - 1)) is not None:
                return found
    return None


def check_bench(obj: dict[str, Any], where: str) -> None:
    f = _Fields(obj, where)
    if not (f.str_("name") or f.str_("model")):
        raise f._missing("name")
    f.str_("model")
    f.str_("backend")
    f.str_("sha256")
    f.int_("file_bytes", required=True)
    f.int_("peak_rss_bytes")
    for key in ("tg_tps", "pp_tps", "ttft_ms"):
        sub = f.sub(key)
        if sub is None:
            if key == "tg_tps":
                raise f._missing(key)
            continue
        for k in _SUMMARY_FIELDS:
            sub.num(k, required=k == "median")
    energy = f.sub("energy")
    if energy is not None:
        jpt = energy.sub("joules_per_token")
        if jpt is not None:
            for k in _SUMMARY_FIELDS:
                jpt.num(k, required=k == "median")


# -- sensitivity maps ----------------------------------------------------------------------


def is_sensitivity(obj: dict[str, Any]) -> bool:
    return "kld" in obj and ("candidates" in obj or "columns" in obj)


def sensitivity_map(
    obj: dict[str, Any], where: str, name: str, model: str | None = None
) -> SensitivityMap:
    """Check a sensitivity report's shape: kld[layer][column] of numbers, one name per column."""
    quant = "candidates" in obj
    key = "candidates" if quant else "columns"
    prefix = "sensitivity." if model is not None else ""
    columns = obj.get(key)
    kld = obj.get("kld")
    if not isinstance(columns, list) or not columns or not all(isinstance(c, str) for c in columns):
        raise InputError(f'{where}: field "{prefix}{key}" is not a list of names', HINT)
    if not isinstance(kld, list) or not kld:
        raise InputError(f'{where}: field "{prefix}kld" is not a list of layers', HINT)
    rows: list[list[float]] = []
    for i, row in enumerate(kld):
        ok = isinstance(row, list) and len(row) == len(columns)
        if ok:
            ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row)
        if not ok:
            raise InputError(
                f'{where}: field "{prefix}kld[{i}]" is not {len(columns)} numbers '
                f"(one per {key[:-1]})",
                HINT,
            )
        rows.append([float(v) for v in row])
    if quant:
        xlabel, title = "type", "KLD when only this layer is quantized (log10)"
    else:
        xlabel = "sublayer"
        what = ", ".join(str(obj[k]) for k in ("method", "pattern") if isinstance(obj.get(k), str))
        if not isinstance(obj.get("pattern"), str) and isinstance(
            obj.get("sparsity"), (int, float)
        ):
            what = f"{what} {obj['sparsity']:.0%}".strip()
        title = (
            f"KLD, one sublayer pruned ({what}; log10)"
            if what
            else "KLD, one sublayer pruned (log10)"
        )
    if model is not None:
        title = f"{model}: {title}"
    return SensitivityMap(name, where if model is None else f"{model} ({where})", rows,
                          list(columns), xlabel, title)  # fmt: skip


def _stem(name: str) -> str:
    base = Path(name.rstrip("/")).name or name
    for suffix in (".json", ".ndjson", ".gguf", ".safetensors", ".onnx"):
        if base.endswith(suffix) and len(base) > len(suffix):
            base = base[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._") or "model"


def _unique_map_names(maps: list[SensitivityMap]) -> None:
    taken: set[str] = set()
    for m in maps:
        name, n = m.name, 1
        while name in taken:
            n += 1
            name = f"{m.name}-{n}"
        m.name = name
        taken.add(name)


# -- merging and joining -------------------------------------------------------------------


def _resolved(path: str | None) -> str | None:
    if not path:
        return None
    try:
        return str(Path(path).expanduser().resolve())
    except (OSError, RuntimeError):
        return path


def _model_key(c: Candidate) -> tuple[str, str | None]:
    return (c.sha256 or _resolved(c.path) or c.name, c.backend)


def _fill(into: Candidate, other: Candidate, notes: list[str]) -> None:
    """Fields the first record of a model left empty, taken from a later one."""
    for attr in ("perplexity", "perplexity_se", "base_perplexity", "kld", "params",
                 "bits_per_weight", "format", "path", "sha256"):  # fmt: skip
        mine, theirs = getattr(into, attr), getattr(other, attr)
        if mine is None and theirs is not None:
            setattr(into, attr, theirs)
            if attr in ("perplexity", "kld") and other.protocol.get("text_sha256"):
                into.protocol = other.protocol  # the protocol those numbers were measured with
        elif attr in ("perplexity", "kld") and theirs is not None and theirs != mine:
            notes.append(
                f"{other.where}: {into.name} ({into.backend}) has {attr} in an earlier record "
                f"({into.where}); the earlier one is used"
            )
    if not into.provenance and other.provenance:
        into.provenance = other.provenance
    for task, metrics in other.tasks.items():
        into.tasks.setdefault(task, metrics)
    into.task_protocol = into.task_protocol or other.task_protocol
    if into.sensitivity is None:
        into.sensitivity = other.sensitivity


def merge_evals(evals: list[Candidate], notes: list[str]) -> list[Candidate]:
    """One candidate per model file and backend, in the order first seen."""
    by_key: dict[tuple[str, str | None], Candidate] = {}
    for c in evals:
        key = _model_key(c)
        if key in by_key:
            _fill(by_key[key], c, notes)
        else:
            by_key[key] = c
    return list(by_key.values())


def _joins(c: Candidate, b: dict[str, Any]) -> bool:
    if c.sha256 and b.get("sha256"):
        return bool(c.sha256 == b["sha256"])
    cp, bp = _resolved(c.path), _resolved(b.get("model"))
    if cp and bp and cp == bp:
        return True
    return c.name == (b.get("name") or b.get("model"))


def _format_of(path: str) -> str | None:
    p = path.rstrip("/")
    for suffix, fmt in ((".gguf", "gguf"), (".safetensors", "safetensors"), (".onnx", "onnx")):
        if p.endswith(suffix):
            return fmt
    return None


def join_bench(candidates: list[Candidate], benches: list[tuple[str, dict[str, Any]]],
               notes: list[str]) -> None:  # fmt: skip
    """Attach each bench record to the eval candidates it measured (a model evaluated on two
    backends gets the same speed on both rows); the rest become bench-only candidates."""
    evaluated = list(candidates)
    for where, b in benches:
        hits = [c for c in evaluated if _joins(c, b)]
        for c in hits:
            c.bench.append(b)
        if hits:
            continue
        name = str(b.get("name") or b.get("model"))
        same = [
            c
            for c in candidates
            if not c.evaluated and c.backend == b.get("backend") and _joins(c, b)
        ]
        if same:
            same[0].bench.append(b)
            continue
        model = b.get("model")
        candidates.append(
            Candidate(
                name=name,
                where=where,
                bytes=int(b["file_bytes"]),
                path=model if isinstance(model, str) else None,
                format=_format_of(str(model or name)),
                backend=b.get("backend"),
                sha256=b.get("sha256"),
                bench=[b],
                evaluated=False,
            )  # fmt: skip
        )
        notes.append(f"{where}: bench record of {name} matches no eval record: speed only")
    for c in candidates:
        chosen = c.speed
        if len(c.bench) > 1 and chosen is not None:
            which = (
                "the one on its eval backend" if chosen.get("backend") == c.backend else "the first"
            )
            notes.append(
                f"{c.name}: {len(c.bench)} bench records; {which} "
                f"({chosen.get('backend')}, {chosen['tg_tps']['median']:.1f} tok/s) is shown"
            )


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)
