"""Mixed precision vs llama.cpp's Q4_K_M at the same file size, on SmolLM2-135M.

Reads llama.cpp's Q4_K_M size and KLD from bench/results/quantize.json (run
bench/quantize.py first), measures per-layer sensitivity on calibration text once, then
asks `cllm quantize --target-size <Q4_K_M bytes>` for RTN, GPTQ and AWQ+GPTQ mixes of
Q4_0 / Q5_0 / Q8_0 blocks (no Q4_1, the base's own grid). Evaluated with llama.cpp,
KLD against the fp32 base. Prints a table, writes bench/results/quantize_mixed.json.

    python bench/quantize_mixed.py --chunks 16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, cllm, print_table, write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    args = ap.parse_args()
    ref = json.loads((RESULTS / "quantize.json").read_text())
    q4km = next(r for r in ref["rows"] if r["tool"] == "llama.cpp" and r["type"] == "Q4_K_M")
    tmp = Path(tempfile.mkdtemp(prefix="cllm-bench-mixed-"))
    sens_out, sens_s = cllm(
        "quantize", "smollm2-135m", "--sensitivity", "-o", str(tmp / "sens.json")
    )
    sens = sens_out.splitlines()[0]
    calib = ["--calib-samples", str(args.calib_samples), "--calib-seqlen", str(args.calib_seqlen)]
    runs = {
        "rtn": [],
        "gptq": ["--method", "gptq", *calib],
        "awq+gptq": ["--method", "awq", "--awq-then", "gptq", *calib],
    }
    rows = []
    for method, extra in runs.items():
        path, t = cllm(
            "quantize", "smollm2-135m", "--target-size", str(q4km["bytes"]), "--sensitivity-file", sens,
            *extra, "-o", str(tmp / f"mixed-{method}.gguf"),
        )  # fmt: skip
        res = json.loads(
            cllm(
                "eval",
                path,
                "-b",
                "llama.cpp",
                "--chunks",
                str(args.chunks),
                "--threads",
                "2",
                "--kld-base",
                "smollm2-135m",
                "--json",
            )[0]
        )
        info = json.loads(cllm("info", path, "--json", "--no-sparsity")[0])
        rows.append(
            {
                "method": method,
                "bytes": Path(path).stat().st_size,
                "types": {k: v["tensors"] for k, v in info["types"].items()},
                "time_s": t,
                "perplexity": res["perplexity"],
                "kld": res["kld"],
                "ratio_vs_q4km": res["kld"]["mean"] / q4km["kld"]["mean"],
            }
        )
    table = [
        [
            "llama.cpp Q4_K_M",
            str(q4km["bytes"]),
            f"{q4km['perplexity']:.3f}",
            f"{q4km['kld']['mean']:.4f}",
            "1.000",
            "",
        ]
    ]
    for r in rows:
        mix = ", ".join(f"{k} {v}" for k, v in sorted(r["types"].items()) if k != "F32")
        table.append(
            [
                f"cllm mixed {r['method']}",
                str(r["bytes"]),
                f"{r['perplexity']:.3f}",
                f"{r['kld']['mean']:.4f}",
                f"{r['ratio_vs_q4km']:.3f}",
                mix,
            ]
        )
    print_table(
        f"Mixed precision at llama.cpp Q4_K_M's size ({q4km['bytes']} B); sensitivity measured in {sens_s:.0f} s",
        ["model", "bytes", "ppl", "mean KLD", "KLD / Q4_K_M", "tensor types"],
        table,
    )
    print(
        f"\nwrote {write_results('quantize_mixed', rows, {'params': vars(args), 'q4_k_m': q4km, 'sensitivity_s': sens_s})}"
    )


if __name__ == "__main__":
    main()
