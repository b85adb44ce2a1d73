"""`make demo`: the main job on the default model, as a user would run it from a shell.

Converts the embedded SmolLM2-135M, exports Q8_0 and Q4_0 GGUFs, quantizes it with
llama.cpp's Q4_K_M recipe and with GPTQ onto the Q4_0 and Q5_0 grids, prunes it to 2:4
with SparseGPT and quantizes that with GPTQ to Q4_0 (zeros kept), removes a quarter of its
MLP channels and wins some of the loss back with a short distillation from the base, and
exports an int4 ONNX decoder. Then one `cllm eval` scores every model against the base (perplexity, KLD, a PIQA
sample; each on its own runtime), one `cllm bench` measures speed, and `cllm report` turns
both into demo-out/report/ (index.md and Pareto plots), whose table is printed last.
DEMO_CHUNKS sets how many 512-token chunks are scored, DEMO_TASK_LIMIT how many PIQA items,
DEMO_DISTILL_STEPS the distillation's optimizer steps (2 windows of 128 tokens each).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markdown import Markdown

OUT = Path(os.environ.get("DEMO_OUT", "demo-out"))
CHUNKS = os.environ.get("DEMO_CHUNKS", "8")
TASK_LIMIT = os.environ.get("DEMO_TASK_LIMIT", "50")
# a small calibration set keeps the demo to a few minutes; bench/quantize.py uses 128 x 512
CALIB = ["--calib-samples", os.environ.get("DEMO_CALIB_SAMPLES", "32"), "--calib-seqlen", "256"]
DISTILL_STEPS = os.environ.get("DEMO_DISTILL_STEPS", "24")
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

    def make(command: list[str]) -> str:
        return cllm(*command).strip()

    models = ["smollm2-135m"]
    for gtype in ("Q8_0", "Q4_0"):
        models.append(make(["export", "smollm2-135m", "--to", "gguf", "--gguf-type", gtype,
                            "-o", str(OUT / f"smollm2-135m.{gtype}.gguf")]))  # fmt: skip
    models.append(make(["quantize", "smollm2-135m", "--gguf-type", "Q4_K_M",
                        "-o", str(OUT / "smollm2-135m.Q4_K_M.gguf")]))  # fmt: skip
    for gtype in ("Q4_0", "Q5_0"):
        models.append(make(["quantize", "smollm2-135m", "--method", "gptq", "--gguf-type", gtype,
                            *CALIB, "-o", str(OUT / f"smollm2-135m.{gtype}-gptq.gguf")]))  # fmt: skip
    # prune -> quantize: 2:4 SparseGPT, then GPTQ on Q4_0 holding the zeros fixed
    pruned = make(["prune", "smollm2-135m", "--method", "sparsegpt", "--pattern", "2:4", *CALIB,
                   "-o", str(OUT / "smollm2-135m.sparsegpt-2of4")])  # fmt: skip
    models.append(make(["quantize", pruned, "--method", "gptq", "--gguf-type", "Q4_0", *CALIB,
                        "-o", str(OUT / "smollm2-135m.sparsegpt-2of4.Q4_0-gptq.gguf")]))  # fmt: skip
    # prune -> distil: a quarter of the MLP channels removed, then a short recovery run with
    # the base as teacher (its top-64 log-probabilities cached on the first pass)
    student = make(["prune", "smollm2-135m", "--structured", "mlp", "--ratio", "0.25",
                    "--dequantize", "-o", str(OUT / "smollm2-135m.mlp-25")])  # fmt: skip
    models.append(student)
    models.append(make(["distill", student, "--teacher", "smollm2-135m", "--steps", DISTILL_STEPS,
                        "--batch-size", "2", "--seqlen", "128", "--lr", "3e-4", "--top-k", "64",
                        "--teacher-cache", str(OUT / "teacher-cache"),
                        "-o", str(OUT / "smollm2-135m.mlp-25.distilled")]))  # fmt: skip
    models.append(make(["export", "smollm2-135m", "--to", "onnx", "--quant", "int4",
                        "-o", str(OUT / "smollm2-135m.int4.onnx")]))  # fmt: skip

    # every model against the base in one run (the base's logits computed once), each on its
    # own runtime: perplexity, KLD and a small task sample, one NDJSON record per model
    results = OUT / "eval.ndjson"
    results.write_text(cllm("eval", *models, "-b", "auto", "--chunks", CHUNKS,
                            "--tasks", "piqa", "--limit", TASK_LIMIT, "--json"))  # fmt: skip
    speed = OUT / "bench.ndjson"
    speed.write_text(cllm("bench", models[0], models[1], models[4], models[5], models[-1],
                          "--prompt", "64", "--gen", "32", "--repeat", "3", "--json"))  # fmt: skip
    report = cllm("report", str(results), str(speed), "-o", str(OUT / "report"),
                  "--title", "SmolLM2-135M-Instruct: make demo").strip()  # fmt: skip
    index = (Path(report) / "index.md").read_text()
    table = index.split("## Models", 1)[1].split("\n\n")[1]
    console = Console(width=max(Console().width, 160))
    console.print(Markdown(table))
    console.print(
        "base = SmolLM2-135M-Instruct, its Q4_1 GGUF dequantized to fp32; "
        f"WikiText-2 test, ctx 512, {CHUNKS} chunks; PIQA, first {TASK_LIMIT} items"
    )
    print(report)


if __name__ == "__main__":
    main()
