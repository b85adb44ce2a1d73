"""Shared by the benchmark scripts: machine facts, run statistics, table + JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    versions = {}
    for dist in ("torch", "transformers", "llama-cpp-python", "gguf", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    try:
        amx = " amx_tile " in Path("/proc/cpuinfo").read_text().replace("\n", " \n ")
    except OSError:
        amx = False
    return {
        "cpu": cpu,
        "amx": amx,
        "cores": os.cpu_count(),
        "ram_gib": mem,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def stats(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def write_results(
    name: str, rows: list[dict[str, Any]], extra: dict[str, Any] | None = None
) -> Path:
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}.json"
    payload = {
        "benchmark": name,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "rows": rows,
        **(extra or {}),
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    return out


def machine_line() -> str:
    """Which CPU a table's figures come from: printed under every title, so figures from an
    AMD and an Intel machine are never mixed unlabelled."""
    m = machine()
    amx = ", lists AMX" if m["amx"] else ""
    return f"machine: {m['cpu'] or 'unknown CPU'}, {m['cores']} cores{amx}, {m['ram_gib']} GiB"


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    print(title)
    print(machine_line())
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


def cllm(*args: str) -> tuple[str, float]:
    """Run the real CLI as a user would; (stdout stripped, wall seconds). Exits on failure."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cllm", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"cllm {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip(), time.perf_counter() - t0


def size_of(path: str) -> int:
    """Bytes of a file, or of every file in an output folder."""
    p = Path(path)
    return (
        sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        if p.is_dir()
        else p.stat().st_size
    )


def quality_vs_base(path: str, chunks: int) -> dict[str, Any]:
    """`cllm eval PATH --kld-base smollm2-135m` on `chunks` chunks: KLD, perplexity, top-1."""
    out, _ = cllm("eval", path, "--chunks", str(chunks), "--kld-base", "smollm2-135m",
                  "--threads", "2", "--json")  # fmt: skip
    rec = json.loads(out)
    ppl = rec["perplexity"]
    return {
        "kld": rec["kld"]["mean"],
        "perplexity": ppl["value"] if isinstance(ppl, dict) else ppl,
        "top1": rec["kld"].get("top1_agreement"),
    }
