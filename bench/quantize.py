"""cllm quantize vs llama.cpp's quantizer on SmolLM2-135M: quality (KLD), size and time.

Base = SmolLM2-135M-Instruct dequantized from its Q4_1 GGUF to fp32. Every output is
evaluated under the pinned protocol (WikiText-2 test, ctx 512, --chunks chunks, second
half scored) with KL divergence against the base: GGUF files with llama.cpp, safetensors
with torch. Prints a table and writes bench/results/quantize.json.

    python bench/quantize.py --chunks 16 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cllm, print_table, size_of, stats, write_results  # noqa: E402

LLAMACPP_TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q3_K_M", "Q4_0", "Q2_K"]


def evaluate(path: str, backend: str, chunks: int) -> dict:
    out, _ = cllm(
        "eval",
        path,
        "-b",
        backend,
        "--chunks",
        str(chunks),
        "--kld-base",
        "smollm2-135m",
        "--threads",
        "2",
        "--json",
    )
    return json.loads(out)


def llamacpp_quantize(src: Path, dst: Path, ftype: str) -> float:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise SystemExit(f"llama.cpp quantize {ftype} failed")
    return time.perf_counter() - t0


def cllm_rtn_gguf_time(dst: Path, gtype: str) -> float:
    """In-process, like the llama.cpp call it is compared with (no interpreter start-up)."""
    from cllm.core.job import run_job
    from cllm.core.quantize.job import QuantizeJob, QuantizeRequest
    from cllm.formats.checkpoint import open_checkpoint

    open_checkpoint("smollm2-135m")  # converted and hashed before the clock starts
    t0 = time.perf_counter()
    job = QuantizeJob(QuantizeRequest(gguf_type=gtype))
    run_job(job, "smollm2-135m", output=dst, force=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3, help="timing repeats for the quantizers")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--skip-gptq", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cllm-bench-q-"))
    rows: list[dict] = []

    f32, _ = cllm(
        "export",
        "smollm2-135m",
        "--to",
        "gguf",
        "--gguf-type",
        "F32",
        "-o",
        str(tmp / "base.F32.gguf"),
    )
    for t in LLAMACPP_TYPES:
        dst = tmp / f"llamacpp.{t}.gguf"
        times = [llamacpp_quantize(Path(f32), dst, t) for _ in range(args.repeat)]
        rows.append(
            {
                "tool": "llama.cpp",
                "method": "quantizer",
                "type": t,
                "path": str(dst),
                "time_s": stats(times),
                "backend": "llama.cpp",
            }
        )
    for t in ("Q8_0", "Q4_0", "Q5_0"):
        dst = tmp / f"cllm-rtn.{t}.gguf"
        times = [cllm_rtn_gguf_time(dst, t) for _ in range(args.repeat)]
        rows.append(
            {
                "tool": "cllm",
                "method": "rtn",
                "type": t,
                "path": str(dst),
                "time_s": stats(times),
                "backend": "llama.cpp",
            }
        )

    def run(method: str, typ: str, backend: str, out_name: str, *flags: str) -> None:
        """One `cllm quantize smollm2-135m ...` CLI run (wall time), recorded as a row."""
        path, t = cllm("quantize", "smollm2-135m", *flags, "-o", str(tmp / out_name))
        rows.append(
            {"tool": "cllm", "method": method, "type": typ, "path": path,
             "time_s": stats([t]), "backend": backend}
        )  # fmt: skip

    # RTN rows: plain min-max groups, and with --clip (the same range search GPTQ does by
    # default), so GPTQ's gain can be read against both
    for bits, group in (("4", "128"), ("3", "64")):
        for clip in ("--no-clip", "--clip"):
            run("rtn" if clip == "--no-clip" else "rtn+clip", f"int{bits} g{group}", "torch",
                f"rtn{clip}-int{bits}-g{group}", "--bits", bits, "--group-size", group, clip,
                "--fake")  # fmt: skip
    for gtype in ("Q4_0", "Q5_0"):
        run(
            "rtn+clip", gtype, "llama.cpp", f"rtn-clip.{gtype}.gguf", "--gguf-type", gtype, "--clip"
        )
    if not args.skip_gptq:
        calib = [
            "--calib-samples",
            str(args.calib_samples),
            "--calib-seqlen",
            str(args.calib_seqlen),
        ]
        # GPTQ as shipped (--clip on), plus one ablation without the range search
        for bits, group, clip in (
            ("4", "128", "--clip"),
            ("3", "64", "--clip"),
            ("3", "64", "--no-clip"),
        ):
            run("gptq" if clip == "--clip" else "gptq --no-clip", f"int{bits} g{group}", "torch",
                f"gptq{clip}-int{bits}-g{group}", "--method", "gptq", "--bits", bits,
                "--group-size", group, clip, "--fake", *calib)  # fmt: skip
        for gtype in ("Q4_0", "Q5_0"):
            run("gptq", gtype, "llama.cpp", f"gptq.{gtype}.gguf", "--method", "gptq",
                "--gguf-type", gtype, *calib)  # fmt: skip
        run("awq", "int4 g128", "torch", "awq-int4-g128", "--method", "awq", "--bits", "4",
            "--group-size", "128", "--fake", *calib)  # fmt: skip
        for gtype in ("Q4_0", "Q5_0"):
            run("awq+gptq", gtype, "llama.cpp", f"awq-gptq.{gtype}.gguf", "--method", "awq",
                "--awq-then", "gptq", "--gguf-type", gtype, *calib)  # fmt: skip

    for r in rows:
        res = evaluate(r["path"], r["backend"], args.chunks)
        r.update(
            bytes=size_of(r["path"]),
            perplexity=res["perplexity"],
            kld=res["kld"],
            protocol=res["protocol"],
        )

    def kld(tool: str, method: str, typ: str) -> float | None:
        for r in rows:
            if (r["tool"], r["method"], r["type"]) == (tool, method, typ):
                return r["kld"]["mean"]
        return None

    def ttime(tool: str, method: str, typ: str) -> float | None:
        for r in rows:
            if (r["tool"], r["method"], r["type"]) == (tool, method, typ):
                return r["time_s"]["median"]
        return None

    checks = []

    def ratio(name: str, a: float | None, b: float | None, limit: float) -> None:
        if a is not None and b is not None and b > 0:
            checks.append({"check": name, "ratio": a / b, "limit": limit, "met": a / b <= limit})

    def info(name: str, a: float | None, b: float | None) -> None:
        """A ratio worth reading that no target sets."""
        if a is not None and b is not None and b > 0:
            checks.append({"check": name, "ratio": a / b, "limit": None, "met": None})

    ratio(
        "GPTQ int4 g128 KLD / RTN int4 g128 KLD",
        kld("cllm", "gptq", "int4 g128"),
        kld("cllm", "rtn", "int4 g128"),
        0.7,
    )
    ratio(
        "GPTQ int3 g64 KLD / RTN int3 g64 KLD",
        kld("cllm", "gptq", "int3 g64"),
        kld("cllm", "rtn", "int3 g64"),
        0.5,
    )
    info(
        "GPTQ int3 g64 KLD / RTN+clip int3 g64 KLD",
        kld("cllm", "gptq", "int3 g64"),
        kld("cllm", "rtn+clip", "int3 g64"),
    )
    info(
        "GPTQ int3 g64 KLD / GPTQ --no-clip int3 g64 KLD",
        kld("cllm", "gptq", "int3 g64"),
        kld("cllm", "gptq --no-clip", "int3 g64"),
    )
    ratio(
        "GPTQ Q4_0 KLD / llama.cpp Q4_0 KLD",
        kld("cllm", "gptq", "Q4_0"),
        kld("llama.cpp", "quantizer", "Q4_0"),
        0.7,
    )
    q4km = next((r for r in rows if r["tool"] == "llama.cpp" and r["type"] == "Q4_K_M"), None)
    if q4km is not None:
        # best cllm GGUF no larger than llama.cpp's Q4_K_M, using no Q4_1 tensors (the base's own grid)
        fits = [
            r for r in rows
            if r["tool"] == "cllm" and r["backend"] == "llama.cpp" and r["bytes"] <= q4km["bytes"] and "Q4_1" not in r["type"]
        ]  # fmt: skip
        if fits:
            best = min(fits, key=lambda r: r["kld"]["mean"])
            ratio(
                f"best cllm GGUF <= Q4_K_M size ({best['method']} {best['type']}) KLD / llama.cpp Q4_K_M KLD",
                best["kld"]["mean"],
                q4km["kld"]["mean"],
                0.7,
            )
    for t in ("Q8_0", "Q4_0", "Q5_0"):
        ratio(
            f"cllm RTN {t} time / llama.cpp {t} time",
            ttime("cllm", "rtn", t),
            ttime("llama.cpp", "quantizer", t),
            2.0,
        )
    gptq_t = ttime("cllm", "gptq", "int4 g128")
    if gptq_t is not None:
        checks.append(
            {
                "check": f"GPTQ int4 g128 time ({args.calib_samples}x{args.calib_seqlen} calibration), s",
                "ratio": gptq_t,
                "limit": 180.0,
                "met": gptq_t <= 180,
            }
        )

    table = [
        [
            r["tool"],
            r["method"],
            r["type"],
            f"{r['bytes'] / 1e6:.1f}",
            f"{r['time_s']['median']:.2f}",
            f"{r['perplexity']:.3f}",
            f"{r['kld']['mean']:.4f}",
            f"{r['kld']['top1_agreement'] * 100:.1f}",
            r["backend"],
        ]
        for r in rows
    ]
    p = rows[0]["protocol"]
    print_table(
        f"SmolLM2-135M quantization (base: Q4_1 GGUF dequantized to fp32); {p['text']}, ctx {p['ctx']}, {p['chunks']} chunks",
        ["tool", "method", "type", "MB", "time s", "ppl", "mean KLD", "top-1 %", "eval backend"],
        table,
    )
    print()
    print_table(
        "targets",
        ["check", "value", "limit", "met"],
        [
            [
                c["check"],
                f"{c['ratio']:.3f}",
                "–" if c["limit"] is None else str(c["limit"]),
                "–" if c["met"] is None else ("yes" if c["met"] else "NO"),
            ]
            for c in checks
        ],
    )
    print(f"\nwrote {write_results('quantize', rows, {'params': vars(args), 'checks': checks})}")


if __name__ == "__main__":
    main()
