"""`cllm bench`: speed and memory of one or more models, each in its own child process."""

from __future__ import annotations

from enum import Enum
from typing import Any

import typer

from cllm.cli._console import log, out_console, use_json
from cllm.cli._emit import emit_json
from cllm.cli._errors import handle_errors
from cllm.cli._options import JSON_OPTION
from cllm.errors import UsageError


class Backend(str, Enum):
    auto = "auto"
    llamacpp = "llama.cpp"
    onnxruntime = "onnxruntime"
    torch = "torch"


def bench_cmd(
    checkpoints: list[str] = typer.Argument(
        ..., help="Models (paths, aliases, ONNX export folders); '-' reads one from stdin."
    ),
    backend: Backend = typer.Option(
        Backend.auto,
        "--backend",
        "-b",
        help="Runtime: auto (GGUF: llama.cpp, ONNX: onnxruntime, else torch), or force one.",
    ),
    threads: int = typer.Option(0, "--threads", "-t", help="Threads [default: min(cores, 8)]."),
    prompt: int = typer.Option(128, "--prompt", help="Prompt tokens processed in one batch."),
    gen: int = typer.Option(64, "--gen", help="Tokens generated one at a time (greedy)."),
    repeat: int = typer.Option(5, "--repeat", help="Timed runs per model (median, min-max)."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed runs first."),
    csv: bool = typer.Option(
        False, "--csv", help="Print CSV (one row per model) instead of a table."
    ),
    remote: str = typer.Option(
        None, "--remote", help="Run on user@host[:port] over ssh (copies the model there)."
    ),
    remote_python: str = typer.Option(
        "python3", "--remote-python", help="--remote: the Python that has the runtime there."
    ),
    ssh_option: list[str] = typer.Option(
        [], "--ssh-option", help="--remote: extra ssh/scp -o KEY=VALUE (repeatable)."
    ),
    identity: str = typer.Option(None, "--identity", "-i", help="--remote: ssh private key."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Measure load time, prompt and generation speed, latency and peak memory.

    Each model runs in its own child process (so its peak memory is its own), with
    --warmup untimed runs, then --repeat timed ones. Several models give one table with
    ratios against the first. Generation's achieved memory bandwidth (weight bytes read
    per token x tokens/s) is shown against this machine's measured copy bandwidth.

    Example:

        cllm bench smollm2-135m m.Q4_0.gguf m.onnx

        cllm bench m.gguf --backend llama.cpp --threads 4 --prompt 128 --gen 64 --repeat 5 --json

        cllm bench m.gguf --remote pi@raspberrypi.local
    """
    _bench(
        checkpoints, backend.value, threads, prompt, gen, repeat, warmup, csv, remote,
        remote_python, ssh_option, identity, as_json,
    )  # fmt: skip


@handle_errors("bench")
def _bench(
    checkpoints: list[str],
    backend: str,
    threads: int,
    prompt: int,
    gen: int,
    repeat: int,
    warmup: int,
    csv: bool,
    remote: str | None,
    remote_python: str,
    ssh_option: list[str],
    identity: str | None,
    as_json: bool,
) -> None:
    from pathlib import Path

    from cllm.core.bench import BenchConfig, run_child, runnable, weight_bytes_per_token
    from cllm.formats.inputs import CHECKPOINT, ONNX, resolve_input

    if csv and use_json(as_json):
        raise UsageError("give --csv or --json, not both")
    if checkpoints.count("-") > 1:
        raise UsageError("only one checkpoint can come from stdin")
    cfg = BenchConfig(backend, threads, prompt, gen, repeat, warmup)
    cfg.validate()
    host = None
    if remote:
        from cllm.core.remote import Remote

        host = Remote.parse(remote, python=remote_python, options=tuple(ssh_option),
                            identity=identity)  # fmt: skip
    elif ssh_option or identity or remote_python != "python3":
        raise UsageError("--remote-python, --ssh-option and --identity apply to --remote only")
    jobs = []
    for arg in checkpoints:  # resolve everything before the first (slow) run
        src = resolve_input(arg, accept=(CHECKPOINT, ONNX))
        ckpt = src.checkpoint
        chosen, target = runnable(src.location, ckpt, backend)
        # the input's content hash (cached per file), so records join with eval's
        jobs.append((src.text, src.sha256, chosen, target, ckpt))
    records = []
    for i, (name, sha256, chosen, target, ckpt) in enumerate(jobs):
        where = f" on {host.dest}" if host else ""
        log(f"[{i + 1}/{len(jobs)}] {name}: {chosen}{where}, {cfg.prompt}+{cfg.gen} x {cfg.repeat}")
        if host:
            from cllm.core.remote import run_remote

            rec = run_remote(host, Path(target), chosen, cfg)
        else:
            rec = run_child(target, chosen, cfg)
        rec["name"] = name
        rec["sha256"] = sha256
        per_token = weight_bytes_per_token(target, chosen, ckpt)
        achieved = per_token * rec["tg_tps"]["median"]
        bandwidth = rec["device"].get("copy_bytes_per_s") or 0.0
        rec["bandwidth"] = {
            "weight_bytes_per_token": per_token,
            "achieved_bytes_per_s": achieved,
            "machine_copy_bytes_per_s": bandwidth,
            "fraction_of_copy": achieved / bandwidth if bandwidth else None,
        }
        records.append(rec)
    base = records[0]
    for rec in records:
        rec["vs_first"] = {
            k: rec[k]["median"] / base[k]["median"] for k in ("pp_tps", "tg_tps", "ttft_ms")
        }
        rec["vs_first"]["file_bytes"] = rec["file_bytes"] / base["file_bytes"]
    if use_json(as_json):
        for rec in records:
            emit_json(rec)
    elif csv:
        _print_csv(records)
    else:
        _print_table(records)


COLUMNS: list[tuple[str, Any]] = [
    ("model", lambda r: r["name"]),
    ("backend", lambda r: r["backend"]),
    ("MB", lambda r: f"{r['file_bytes'] / 1e6:.1f}"),
    ("load s", lambda r: f"{r['load_s']:.2f}"),
    ("pp tok/s", lambda r: _mm(r["pp_tps"], "{:.0f}")),
    ("tg tok/s", lambda r: _mm(r["tg_tps"], "{:.1f}")),
    ("TTFT ms", lambda r: f"{r['ttft_ms']['median']:.0f}"),
    ("p50/p90/p99 ms", lambda r: "/".join(f"{r['latency_ms'][q]:.1f}" for q in ("p50", "p90", "p99"))),
    ("peak RSS MB", lambda r: f"{r['peak_rss_bytes'] / 1e6:.0f}"),
    ("GB/s (of copy)", lambda r: f"{r['bandwidth']['achieved_bytes_per_s'] / 1e9:.1f} ({r['bandwidth']['fraction_of_copy'] * 100:.0f}%)"),
    ("J/token", lambda r: _fmt(_j_per_token(r), "{:.3g}")),
    ("tg x first", lambda r: f"{r['vs_first']['tg_tps']:.2f}"),
    ("threads", lambda r: str(r["threads"])),
]  # fmt: skip


def _j_per_token(r: dict[str, Any]) -> float | None:
    """Median joules per generated token, where the machine reported power."""
    energy = r.get("energy") or {}
    return (energy.get("joules_per_token") or {}).get("median")


def _fmt(value: float | None, fmt: str, missing: str = "n/a") -> str:
    return missing if value is None else fmt.format(value)


def _mm(s: dict[str, float], fmt: str) -> str:
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])})"


def _print_table(records: list[dict[str, Any]]) -> None:
    from rich.table import Table

    r0 = records[0]
    table = Table(
        title=f"prompt {r0['prompt']}, gen {r0['gen']}, {r0['repeat']} runs (median, min-max); "
        f"{r0['device'].get('cpu', '?')}",
        title_justify="left",
    )
    for name, _ in COLUMNS:
        table.add_column(name, justify="left" if name in ("model", "backend") else "right")
    for rec in records:
        table.add_row(*(fn(rec) for _, fn in COLUMNS))
    con = out_console()
    if not con.is_terminal:  # a file or pipe: no wrapping into 80 columns
        con.width = max(con.width, 240)
    con.print(table)


def _print_csv(records: list[dict[str, Any]]) -> None:
    import csv as csvmod
    import sys

    fields = [
        "name", "backend", "file_bytes", "threads", "prompt", "gen", "repeat", "load_s",
        "pp_tps", "tg_tps", "ttft_ms", "p50_ms", "p90_ms", "p99_ms", "peak_rss_bytes",
        "achieved_bytes_per_s", "machine_copy_bytes_per_s", "tg_vs_first", "j_per_token",
        "energy_source", "sha256",
    ]  # fmt: skip
    w = csvmod.writer(sys.stdout)
    w.writerow(fields)
    for r in records:
        w.writerow([
            r["name"], r["backend"], r["file_bytes"], r["threads"], r["prompt"], r["gen"],
            r["repeat"], f"{r['load_s']:.4f}", f"{r['pp_tps']['median']:.3f}",
            f"{r['tg_tps']['median']:.3f}", f"{r['ttft_ms']['median']:.3f}",
            *(f"{r['latency_ms'][q]:.3f}" for q in ("p50", "p90", "p99")),
            r["peak_rss_bytes"], f"{r['bandwidth']['achieved_bytes_per_s']:.0f}",
            f"{r['bandwidth']['machine_copy_bytes_per_s']:.0f}", f"{r['vs_first']['tg_tps']:.4f}",
            _fmt(_j_per_token(r), "{:.6g}", ""), (r.get("energy") or {}).get("source", ""),
            r.get("sha256", ""),
        ])  # fmt: skip
