"""Pruning quality, speed and deployment on SmolLM2-135M, cllm beside llm-compressor.

Base: SmolLM2-135M-Instruct dequantized from its Q4_1 GGUF (fp32). Quality: KLD against
that base over 16 chunks of 512 tokens of WikiText-2 test (DESIGN.md section 6, torch
backend). Calibration: 128 x 512 tokens of WikiText-2 validation, seed 0, the same windows
for cllm and the peer (the peer is handed cllm's token ids).

Targets (issue 9): Wanda 50% KLD <= 0.5 x magnitude, SparseGPT <= Wanda; at 2:4
SparseGPT <= Wanda <= 0.5 x magnitude; Wanda 70% OWL <= 0.8 x uniform (also
shown: a profile from a measured sensitivity map); dropping 4 layers
by block influence beats dropping the last 4; structured MLP 25% makes Q4_0 generation in
llama.cpp >= 1.15x faster; against llm-compressor: KLD <= theirs, wall time <= 0.5 x
theirs; Wanda 50% <= 120 s, SparseGPT 50% <= 240 s.

    python bench/prune.py                    # everything (about an hour on 2 cores)
    python bench/prune.py --skip-peers --skip-speed
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cllm, print_table, quality_vs_base, size_of, stats, write_results  # noqa: E402

PEERS = Path(__file__).resolve().parent / "peers"
PEER_PYTHON = PEERS / "llmcompressor" / ".venv" / "bin" / "python"
PEER_RUNNER = PEERS / "llmcompressor_prune.py"


def kld_of(path: str, chunks: int) -> dict[str, Any]:
    q = quality_vs_base(path, chunks)
    return {"kld": q["kld"], "perplexity": q["perplexity"]}


def params_of(path: str) -> int:
    out, _ = cllm("info", path, "--json", "--no-sparsity")
    return int(json.loads(out)["params"])


def peer_run(base_hf: str, ids: Path, method: str, sparsity: str, pattern: str | None,
             out: Path, timeout: float) -> dict[str, Any]:  # fmt: skip
    """llm-compressor in its own virtual environment; its exact error when it fails."""
    result = out.with_suffix(".json")
    cmd = [
        str(PEER_PYTHON),
        str(PEER_RUNNER),
        "--model",
        base_hf,
        "--calib-ids",
        str(ids),
        "--method",
        method,
        "--sparsity",
        sparsity,
        "--out",
        str(out),
        "--json",
        str(result),
    ]
    if pattern:
        cmd += ["--pattern", pattern]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {timeout:.0f} s (--peer-timeout)", "wall_s": timeout}
    wall = time.perf_counter() - t0
    try:
        rec = json.loads(result.read_text())
    except (OSError, ValueError):
        rec = {"error": (proc.stderr or proc.stdout).strip()[-2000:] or f"exit {proc.returncode}"}
    rec["wall_s"] = wall
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument(
        "--repeat", type=int, default=1, help="timing runs of the 50%% Wanda/SparseGPT rows"
    )
    ap.add_argument("--sensitivity-samples", type=int, default=16,
                    help="calibration samples of the sensitivity map behind the profile case")  # fmt: skip
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--peer-timeout", type=float, default=3600.0, help="seconds per peer run")
    ap.add_argument("--cases", default=None,
                    help="comma-separated case labels to run (default: all), e.g. 'wanda 50%%'")  # fmt: skip
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--work", type=Path, default=None, help="keep outputs here")
    args = ap.parse_args()
    tmp = args.work or Path(tempfile.mkdtemp(prefix="cllm-prune-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    cal = ["--calib-samples", str(args.calib_samples), "--calib-seqlen", str(args.calib_seqlen)]
    rows: list[dict[str, Any]] = []

    wanted = {c.strip() for c in args.cases.split(",")} if args.cases else None

    def run(tool: str, label: str, name: str, *flags: str, repeat: int = 1) -> dict[str, Any]:
        if wanted is not None and label not in wanted:
            return {"path": None}
        times = []
        path = ""
        for _ in range(repeat):
            path, t = cllm("prune", "smollm2-135m", *flags, "-o", str(tmp / name), "--force")
            times.append(t)
        row = {"tool": tool, "case": label, "path": path, "time_s": stats(times)}
        rows.append(row)
        return row

    run("cllm", "magnitude 50%", "mag50", "--method", "magnitude", "--sparsity", "0.5")
    run(
        "cllm",
        "wanda 50%",
        "wanda50",
        "--method",
        "wanda",
        "--sparsity",
        "0.5",
        *cal,
        repeat=args.repeat,
    )
    run("cllm", "sparsegpt 50%", "sgpt50", "--method", "sparsegpt", "--sparsity", "0.5", *cal,
        repeat=args.repeat)  # fmt: skip
    run("cllm", "magnitude 2:4", "mag24", "--method", "magnitude", "--pattern", "2:4")
    run("cllm", "wanda 2:4", "wanda24", "--method", "wanda", "--pattern", "2:4", *cal)
    run("cllm", "sparsegpt 2:4", "sgpt24", "--method", "sparsegpt", "--pattern", "2:4", *cal)
    run("cllm", "wanda 70%", "wanda70", "--method", "wanda", "--sparsity", "0.7", *cal)
    run("cllm", "wanda 70% owl", "wanda70owl", "--method", "wanda", "--sparsity", "0.7",
        "--profile", "owl", *cal)  # fmt: skip
    if wanted is None or "wanda 70% sensitivity profile" in wanted:
        # the measured alternative to OWL: one sublayer pruned at a time (a smaller calibration
        # set keeps the 60 measurements short), then per-layer sparsities from the map
        sens, sens_t = cllm("prune", "smollm2-135m", "--method", "wanda", "--sparsity", "0.7",
                            "--sensitivity", "--calib-samples", str(args.sensitivity_samples),
                            "--calib-seqlen", str(args.calib_seqlen),
                            "-o", str(tmp / "sens70.json"), "--force")  # fmt: skip
        row = run("cllm", "wanda 70% sensitivity profile", "wanda70prof", "--method", "wanda",
                  "--sparsity", "0.7", "--profile", sens.split()[0], "--owl-lambda", "0.25",
                  *cal)  # fmt: skip
        row["sensitivity_time_s"] = sens_t
    run("cllm", "drop 4 block-influence", "drop4bi", "--drop-layers", "4", "--layer-metric",
        "block-influence", *cal)  # fmt: skip
    run("cllm", "drop 4 angular-distance", "drop4ad", "--drop-layers", "4", "--layer-metric",
        "angular-distance", *cal)  # fmt: skip
    run("cllm", "drop last 4", "drop4last", "--drop-layers", "4", "--layer-metric", "last", *cal)
    mlp = run("cllm", "structured mlp 25%", "mlp25", "--structured", "mlp", "--ratio", "0.25", *cal)
    run("cllm", "structured heads 33%", "heads33", "--structured", "heads", "--ratio", "0.33", *cal)

    if not args.skip_peers:
        base_hf, _ = cllm(
            "export", "smollm2-135m", "--to", "safetensors", "-o", str(tmp / "base-hf")
        )
        ids = tmp / "calib-ids.npy"
        subprocess.run([sys.executable, "-c", (
            "import numpy as np, sys; from cllm.core.calib import CalibrationOptions; "
            "from cllm.formats.checkpoint import open_checkpoint; "
            f"c = open_checkpoint('smollm2-135m'); o = CalibrationOptions(calib_samples={args.calib_samples}, "
            f"calib_seqlen={args.calib_seqlen}); np.save(sys.argv[1], o.load_calibration(c.tokenizer_dir()).ids.numpy())"
        ), str(ids)], check=True)  # fmt: skip
        for method in ("wanda", "sparsegpt"):
            for label, sparsity, pattern in (("50%", "0.5", None), ("2:4", "0.5", "2:4")):
                if wanted is not None and f"{method} {label}" not in wanted:
                    continue
                out = tmp / f"peer-{method}-{label.replace(':', '').replace('%', '')}"
                rec = peer_run(base_hf, ids, method, sparsity, pattern, out, args.peer_timeout)
                rows.append({"tool": "llm-compressor", "case": f"{method} {label}",
                             "path": str(out) if not rec.get("error") else None,
                             "time_s": stats([rec["wall_s"]]), "peer": rec})  # fmt: skip

    for r in rows:
        if r["path"]:
            r.update(kld_of(r["path"], args.chunks))
            r["params"] = params_of(r["path"])

    speed: dict[str, Any] = {}
    if not args.skip_speed and mlp["path"]:
        base_q, _ = cllm(
            "quantize", "smollm2-135m", "--gguf-type", "Q4_0", "-o", str(tmp / "base.Q4_0.gguf")
        )
        mlp_q, _ = cllm(
            "quantize", mlp["path"], "--gguf-type", "Q4_0", "-o", str(tmp / "mlp25.Q4_0.gguf")
        )
        out, _ = cllm("bench", base_q, mlp_q, "--backend", "llama.cpp", "--threads", "2",
                      "--repeat", "7", "--json")  # fmt: skip
        recs = [json.loads(line) for line in out.splitlines() if line.strip()]
        speed = {
            "base_tg_tps": recs[0]["tg_tps"]["median"],
            "mlp25_tg_tps": recs[1]["tg_tps"]["median"],
            "base_gguf_bytes": size_of(base_q),
            "mlp25_gguf_bytes": size_of(mlp_q),
        }
        speed["speedup"] = speed["mlp25_tg_tps"] / speed["base_tg_tps"]

    def get(tool: str, case: str, key: str = "kld") -> float | None:
        for r in rows:
            if (r["tool"], r["case"]) == (tool, case):
                v = r.get(key) if key != "time" else r["time_s"]["median"]
                return None if v is None else float(v)
        return None

    checks: list[dict[str, Any]] = []

    def le(name: str, a: float | None, b: float | None, factor: float = 1.0) -> None:
        if a is not None and b is not None:
            checks.append({"check": name, "value": a, "bound": factor * b, "met": a <= factor * b})

    le(
        "wanda 50% <= 0.5 x magnitude 50%",
        get("cllm", "wanda 50%"),
        get("cllm", "magnitude 50%"),
        0.5,
    )
    le("sparsegpt 50% <= wanda 50%", get("cllm", "sparsegpt 50%"), get("cllm", "wanda 50%"))
    le("sparsegpt 2:4 <= wanda 2:4", get("cllm", "sparsegpt 2:4"), get("cllm", "wanda 2:4"))
    le(
        "wanda 2:4 <= 0.5 x magnitude 2:4",
        get("cllm", "wanda 2:4"),
        get("cllm", "magnitude 2:4"),
        0.5,
    )
    le("owl 70% <= 0.8 x uniform 70%", get("cllm", "wanda 70% owl"), get("cllm", "wanda 70%"), 0.8)
    le("sensitivity profile 70% <= 0.8 x uniform 70%", get("cllm", "wanda 70% sensitivity profile"),
       get("cllm", "wanda 70%"), 0.8)  # fmt: skip
    le("drop 4 block-influence < drop last 4", get("cllm", "drop 4 block-influence"),
       get("cllm", "drop last 4"))  # fmt: skip
    if (args.calib_samples, args.calib_seqlen) == (128, 512):  # the time protocol
        le("wanda 50% time <= 120 s", get("cllm", "wanda 50%", "time"), 120.0)
        le("sparsegpt 50% time <= 240 s", get("cllm", "sparsegpt 50%", "time"), 240.0)
    for case in ("wanda 50%", "wanda 2:4", "sparsegpt 50%", "sparsegpt 2:4"):
        le(f"{case}: KLD <= llm-compressor", get("cllm", case), get("llm-compressor", case))
        le(f"{case}: time <= 0.5 x llm-compressor", get("cllm", case, "time"),
           get("llm-compressor", case, "time"), 0.5)  # fmt: skip
    if speed:
        checks.append({"check": "mlp 25% Q4_0 generation speed-up >= 1.15", "value": speed["speedup"],
                       "bound": 1.15, "met": speed["speedup"] >= 1.15})  # fmt: skip

    def fmt(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    print_table(
        f"cllm prune on SmolLM2-135M (KLD vs fp32 base, {args.chunks} x 512 tokens)",
        ["tool", "case", "KLD", "ppl", "params", "time s"],
        [[r["tool"], r["case"], fmt(r.get("kld"), ".4f"), fmt(r.get("perplexity"), ".2f"),
          fmt(r.get("params"), ","),
          fmt(r["time_s"]["median"], ".1f") if not (r.get("peer") or {}).get("error") else "error"]
         for r in rows],
    )  # fmt: skip
    for r in rows:
        err = (r.get("peer") or {}).get("error")
        if err:
            print(f"  {r['tool']} {r['case']} failed: {err.splitlines()[-1] if err else ''}")
    if speed:
        print(f"\nstructured mlp 25%: Q4_0 GGUF {speed['base_gguf_bytes']:,} -> {speed['mlp25_gguf_bytes']:,} bytes; "
              f"llama.cpp generation {speed['base_tg_tps']:.1f} -> {speed['mlp25_tg_tps']:.1f} tok/s "
              f"({speed['speedup']:.2f}x)")  # fmt: skip
    print()
    print_table("targets", ["check", "value", "bound", "met"],
                [[c["check"], f"{c['value']:.4g}", f"{c['bound']:.4g}", str(c["met"])] for c in checks])  # fmt: skip
    out = write_results("prune", rows, {"checks": checks, "speed": speed, "work": str(tmp)})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
