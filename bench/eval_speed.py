"""Evaluation throughput (tokens/s) of each `cllm eval` backend on SmolLM2-135M.

Each backend is loaded once; then `--runs` times, `--chunks` chunks of `--ctx` tokens
of WikiText-2 are pushed through it, exactly as `cllm eval` does (logits for every
position). Prints a table, writes bench/results/eval_speed.json.

llama.cpp runs as `cllm eval` runs it, in a worker process (a crash there is one line from
cllm, not a dead cllm); each GGUF is then also run in this process, alternating with the
worker round by round, to show what that isolation costs (a second table).

    python bench/eval_speed.py --runs 5 --chunks 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, stats, write_results  # noqa: E402

from cllm.core.eval.backends import LlamaCppBackend, LlamaCppSession, TorchBackend  # noqa: E402
from cllm.core.eval.data import load_tokens, make_chunks  # noqa: E402
from cllm.formats.checkpoint import open_checkpoint  # noqa: E402
from cllm.formats.provenance import make_provenance  # noqa: E402
from cllm.formats.save import save_gguf  # noqa: E402
from cllm.paths import default_eval_text  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default="F32,Q8_0,Q4_0", help="GGUF types for the llama.cpp backend")
    args = ap.parse_args()

    base = open_checkpoint("smollm2-135m")
    toks = load_tokens(default_eval_text(), base.tokenizer_dir())
    chunks = make_chunks(toks.ids, args.ctx, args.chunks)
    tmp = Path(tempfile.mkdtemp(prefix="cllm-bench-"))
    candidates = [("torch", "fp32 safetensors", lambda: TorchBackend(base, threads=args.threads))]
    for t in args.types.split(","):
        path = tmp / f"smollm2.{t}.gguf"
        save_gguf(path, base, t, make_provenance("export", {"gguf_type": t}, base.sha256, None))
        candidates.append(
            ("llama.cpp", f"{t} GGUF", lambda p=path: LlamaCppBackend(p, args.ctx, args.threads))
        )

    rows, table = [], []
    for backend_name, model, factory in candidates:
        t0 = time.perf_counter()
        backend = factory()
        load_s = time.perf_counter() - t0
        backend.logits(chunks[0])  # warm-up
        tps = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            for c in chunks:
                backend.logits(c)
            tps.append(len(chunks) * args.ctx / (time.perf_counter() - t0))
        backend.close()
        s = stats(tps)
        rows.append({"backend": backend_name, "model": model, "load_s": load_s, "tokens_per_s": s})
        table.append(
            [
                backend_name,
                model,
                f"{load_s:.2f}",
                f"{s['median']:.0f}",
                f"{s['min']:.0f}-{s['max']:.0f}",
            ]
        )
    print_table(
        f"cllm eval throughput, SmolLM2-135M, ctx {args.ctx}, {args.chunks} chunks x {args.runs} runs, {args.threads} threads",
        ["backend", "model", "load s", "tok/s median", "tok/s min-max"],
        table,
    )
    # isolation cost: the same GGUF in a worker and in this process, alternating round by
    # round so the machine's drift hits both alike; ratio of the two times per round
    cost, cost_rows = [], []
    for t in args.types.split(","):
        path = tmp / f"smollm2.{t}.gguf"
        ratios = []
        for _ in range(args.runs):
            times = []
            # one llama.cpp instance alive at a time: two loaded side by side slowed each
            # other, whichever ran
            for make in (lambda p=path: LlamaCppBackend(p, args.ctx, args.threads),
                         lambda p=path: LlamaCppSession(str(p), args.ctx, args.threads)):  # fmt: skip
                b = make()
                b.logits(chunks[0])  # warm-up
                t0 = time.perf_counter()
                for c in chunks:
                    b.logits(c)
                times.append(time.perf_counter() - t0)
                b.close()
            ratios.append(times[1] / times[0])  # worker speed relative to in-process
        r = stats(ratios)
        cost_rows.append({"model": f"{t} GGUF", "worker_over_in_process_speed": r})
        cost.append([f"{t} GGUF", f"{r['median']:.3f}", f"{r['min']:.3f}-{r['max']:.3f}"])
    print()
    print_table(
        f"cost of running llama.cpp in a worker process (what cllm eval does), {args.runs} "
        "alternating rounds",
        ["model", "worker/in-process speed, median", "min-max"],
        cost,
    )
    out = write_results("eval_speed", rows, {"params": vars(args), "isolation": cost_rows})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
