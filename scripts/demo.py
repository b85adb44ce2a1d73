"""`make demo`: the main job on the default model, as a user would run it from a shell.

Converts the embedded SmolLM2-135M, exports Q8_0 and Q4_0 GGUFs, quantizes it with
llama.cpp's Q4_K_M recipe and with GPTQ onto the Q4_0 and Q5_0 grids, prunes it to 2:4
with SparseGPT and quantizes that with GPTQ to Q4_0 (zeros kept), evaluates the base
(torch) and every GGUF (llama.cpp) with KL divergence against the base, then prints one
size / perplexity / KLD table. Then it exports an int4 ONNX decoder and ends with one
`cllm bench` speed table of the base against the compressed outputs. DEMO_CHUNKS sets how
many 512-token chunks are scored.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

OUT = Path(os.environ.get("DEMO_OUT", "demo-out"))
CHUNKS = os.environ.get("DEMO_CHUNKS", "8")
# a small calibration set keeps the demo to a few minutes; bench/quantize.py uses 128 x 512
CALIB = ["--calib-samples", os.environ.get("DEMO_CALIB_SAMPLES", "32"), "--calib-seqlen", "256"]
err = Console(stderr=True, highlight=False, soft_wrap=True)


def cllm(*args: str) -> str:
    cmd = ["cllm", *args]
    err.print(f"[bold]$ {shlex.join(cmd)}[/bold]")
    t = time.time()
    proc = subprocess.run([sys.executable, "-m", "cllm", *args], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        err.print(f"[red]failed with exit code {proc.returncode}[/red]")
        sys.exit(proc.returncode)
    err.print(f"  [dim]({time.time() - t:.1f} s)[/dim]")
    return proc.stdout


def main() -> None:
    OUT.mkdir(exist_ok=True)
    print(cllm("info", "smollm2-135m", "--no-sparsity"), end="")
    rows = []
    base = json.loads(cllm("eval", "smollm2-135m", "--chunks", CHUNKS, "--json"))
    base_info = json.loads(cllm("info", "smollm2-135m", "--no-sparsity", "--json"))
    rows.append(("base (fp32 safetensors)", "torch", base_info, base))

    paths: dict[str, str] = {}

    def add(label: str, command: list[str]) -> None:
        """Write one GGUF with `command`, then inspect and evaluate it against the base."""
        path = cllm(*command).strip()
        paths[label] = path
        info = json.loads(cllm("info", path, "--no-sparsity", "--json"))
        res = json.loads(
            cllm(
                "eval",
                path,
                "--backend",
                "llama.cpp",
                "--kld-base",
                "smollm2-135m",
                "--chunks",
                CHUNKS,
                "--json",
            )
        )
        rows.append((label, "llama.cpp", info, res))

    for gtype in ("Q8_0", "Q4_0"):
        out = str(OUT / f"smollm2-135m.{gtype}.gguf")
        add(
            f"{gtype} GGUF (export)",
            ["export", "smollm2-135m", "--to", "gguf", "--gguf-type", gtype, "-o", out],
        )
    add(
        "Q4_K_M GGUF (llama.cpp recipe)",
        [
            "quantize",
            "smollm2-135m",
            "--gguf-type",
            "Q4_K_M",
            "-o",
            str(OUT / "smollm2-135m.Q4_K_M.gguf"),
        ],
    )
    for gtype in ("Q4_0", "Q5_0"):
        out = str(OUT / f"smollm2-135m.{gtype}-gptq.gguf")
        add(
            f"{gtype} GGUF (GPTQ)",
            [
                "quantize",
                "smollm2-135m",
                "--method",
                "gptq",
                "--gguf-type",
                gtype,
                *CALIB,
                "-o",
                out,
            ],
        )

    # prune -> quantize -> eval: 2:4 SparseGPT, then GPTQ on Q4_0 holding the zeros fixed
    pruned = cllm("prune", "smollm2-135m", "--method", "sparsegpt", "--pattern", "2:4", *CALIB,
                  "-o", str(OUT / "smollm2-135m.sparsegpt-2of4"))  # fmt: skip
    out = str(OUT / "smollm2-135m.sparsegpt-2of4.Q4_0-gptq.gguf")
    add("2:4 SparseGPT, then Q4_0 GPTQ", ["quantize", pruned.strip(), "--method", "gptq",
                                          "--gguf-type", "Q4_0", *CALIB, "-o", out])  # fmt: skip

    proto = base["protocol"]
    table = Table(
        title="SmolLM2-135M-Instruct (base = its Q4_1 GGUF dequantized to fp32)",
        caption=f"{proto['text']}, ctx {proto['ctx']}, {proto['chunks']} chunks, {proto['tokens_scored']} tokens scored (second half of each chunk)",
    )
    for col in (
        "model",
        "backend",
        "size",
        "bits/weight",
        "perplexity",
        "mean KLD",
        "KLD p99",
        "top-1 agree",
    ):
        table.add_column(col, justify="left" if col in ("model", "backend") else "right")
    for name, backend, info, res in rows:
        k = res.get("kld")
        table.add_row(
            name,
            backend,
            f"{info['file_bytes'] / 1e6:.1f} MB",
            f"{info['bits_per_weight']:.2f}",
            f"{res['perplexity']:.3f} ± {res['perplexity_se']:.3f}",
            f"{k['mean']:.5f}" if k else "-",
            f"{k['p99']:.4f}" if k else "-",
            f"{k['top1_agreement'] * 100:.1f}%" if k else "-",
        )
    Console(width=max(Console().width, 110)).print(table)

    onnx = cllm("export", "smollm2-135m", "--to", "onnx", "--quant", "int4",
                "-o", str(OUT / "smollm2-135m.int4.onnx")).strip()  # fmt: skip
    speed = [
        "smollm2-135m", paths["Q8_0 GGUF (export)"], paths["Q4_0 GGUF (GPTQ)"],
        paths["Q5_0 GGUF (GPTQ)"], onnx,
    ]  # fmt: skip
    print(cllm("bench", *speed, "--prompt", "64", "--gen", "32", "--repeat", "3"), end="")


if __name__ == "__main__":
    main()
