"""Quality of cllm's GGUF exports on SmolLM2-135M under the pinned protocol.

Base = SmolLM2-135M-Instruct dequantized from its Q4_1 GGUF to fp32, evaluated with torch.
Each GGUF that `cllm export` writes is evaluated with llama.cpp, with KL divergence against
the base over the same positions. Runs the real CLI, as a user would. Prints a table,
writes bench/results/quality.json.

    python bench/quality.py --chunks 16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cllm, print_table, write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--types", default="F32,Q8_0,Q5_1,Q5_0,Q4_1,Q4_0")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cllm-quality-"))
    n = str(args.chunks)
    t0 = time.perf_counter()
    base = json.loads(
        cllm("eval", "smollm2-135m", "--chunks", n, "--threads", str(args.threads), "--json")[0]
    )
    rows = [
        {
            **base,
            "label": "base fp32",
            "bytes": None,
            "eval_s": time.perf_counter() - t0,
        }
    ]
    for t in args.types.split(","):
        path = cllm(
            "export",
            "smollm2-135m",
            "--to",
            "gguf",
            "--gguf-type",
            t,
            "-o",
            str(tmp / f"smol.{t}.gguf"),
        )[0]
        t0 = time.perf_counter()
        res = json.loads(
            cllm(
                "eval",
                path,
                "-b",
                "llama.cpp",
                "--chunks",
                n,
                "--threads",
                str(args.threads),
                "--kld-base",
                "smollm2-135m",
                "--json",
            )[0]
        )
        rows.append(
            {
                **res,
                "label": f"{t} GGUF",
                "bytes": Path(path).stat().st_size,
                "eval_s": time.perf_counter() - t0,
            }
        )
    table = []
    for r in rows:
        k = r.get("kld")
        table.append(
            [
                r["label"],
                r["backend"],
                f"{r['bytes'] / 1e6:.1f}" if r["bytes"] else "538.1",
                f"{r['perplexity']:.3f} ± {r['perplexity_se']:.3f}",
                f"{k['mean']:.5f} ± {k['mean_se']:.5f}" if k else "-",
                f"{k['p99']:.4f}" if k else "-",
                f"{k['top1_agreement'] * 100:.2f}" if k else "-",
            ]
        )
    p = base["protocol"]
    print_table(
        f"SmolLM2-135M (base: Q4_1 GGUF dequantized to fp32), {p['text']}, ctx {p['ctx']}, {p['chunks']} chunks, {p['tokens_scored']} tokens scored",
        ["model", "backend", "MB", "perplexity", "mean KLD", "KLD p99", "top-1 %"],
        table,
    )
    print(f"\nwrote {write_results('quality', rows, {'params': vars(args)})}")


if __name__ == "__main__":
    main()
