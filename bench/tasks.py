"""Task accuracy parity and speed: cllm's lm-eval model class (torch and llama.cpp backends)
against lm-eval's own `hf` model, on the same local task configs, the same base model and
the same items, in one run.

The base is SmolLM2-135M dequantized from its Q4_1 GGUF (the `smollm2-135m` alias's fp32
safetensors folder). lm-eval's `hf` model loads that folder; cllm's llama.cpp backend runs
its F32 GGUF (converted once, as `cllm eval -b llama.cpp` does). Each engine is timed from
`simple_evaluate` in to results out (model loading excluded, identical data loading).

    python bench/tasks.py --limit 500
    python bench/tasks.py --limit 50 --tasks arc_easy,piqa      # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, write_results  # noqa: E402

ALL = "arc_easy,arc_challenge,hellaswag,piqa,winogrande,lambada_openai"
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _count_requests(lm: Any) -> Any:
    """Wrap an lm-eval model so its requests are counted (loglikelihood ones)."""
    counted = {"n": 0}
    inner = lm.loglikelihood

    def loglikelihood(requests: list[Any], *a: Any, **k: Any) -> Any:
        counted["n"] += len(requests)
        return inner(requests, *a, **k)

    lm.loglikelihood = loglikelihood
    return counted


PEER = Path(__file__).resolve().parent / "peers" / "llamacpp-server" / ".venv" / "bin" / "python"


def _http_peer(folder: Path) -> tuple[Any, Any]:
    """llama-cpp-python's server (peer venv, `bench/peers/setup_llamacpp_server.sh`) on the
    same F32 GGUF cllm's llama.cpp backend runs, and lm-eval's own `gguf` model talking to
    it over HTTP, one request per item."""
    import subprocess
    import urllib.request

    from lm_eval.models.gguf import GGUFLM

    from cllm.core.eval.backends import gguf_for_llamacpp
    from cllm.formats.checkpoint import open_checkpoint

    if not PEER.exists():
        raise SystemExit(
            f"peer venv missing: run bash bench/peers/setup_llamacpp_server.sh ({PEER})"
        )
    gguf = gguf_for_llamacpp(open_checkpoint(folder))
    port = 8765
    log = open(RESULTS_DIR / "llamacpp-server.log", "w")  # noqa: SIM115 - lives with the server
    server = subprocess.Popen(
        [str(PEER), "-m", "llama_cpp.server", "--model", str(gguf), "--n_ctx", "2048",
         "--logits_all", "true", "--n_threads", "2", "--n_threads_batch", "2",
         "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1)
            break
        except OSError:
            if server.poll() is not None:
                msg = f"llama-cpp-python server exited {server.returncode}; see {log.name}"
                raise SystemExit(msg) from None
            time.sleep(1)
    return server, GGUFLM(base_url=f"http://127.0.0.1:{port}", max_length=2048)


def run_engine(engine: str, folder: Path, tasks: list[str], limit: int, batch: int) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from cllm.core.tasks.local import task_config
    from cllm.core.tasks.run import _no_tqdm, _quiet_lm_eval

    _quiet_lm_eval()
    specs = [task_config(t, None)[0] for t in tasks]
    scorer = None
    server = None
    if engine == "lm-eval gguf http":
        server, lm = _http_peer(folder)
    elif engine == "lm-eval hf":
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=str(folder), dtype="float32", batch_size=batch, device="cpu")
    else:
        from transformers import AutoTokenizer

        from cllm.core.tasks.lm import CllmLM
        from cllm.core.tasks.sessions import open_scorer
        from cllm.formats.checkpoint import open_checkpoint

        ckpt = open_checkpoint(folder)
        backend = engine.split()[-1]
        scorer = open_scorer(ckpt, backend, 2048, 2, batch)
        tok = AutoTokenizer.from_pretrained(str(ckpt.tokenizer_dir()))
        lm = CllmLM(scorer, tok, 2048, 64)
    counted = _count_requests(lm)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr), _no_tqdm():
        out = lm_eval.simple_evaluate(
            model=lm, tasks=specs, limit=limit, task_manager=TaskManager(include_defaults=False),
            random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
            bootstrap_iters=1000, log_samples=False,
        )  # fmt: skip
    seconds = time.perf_counter() - t0
    if scorer is not None:
        scorer.close()
    if server is not None:
        server.terminate()
        server.wait()
    res = {}
    for t in tasks:
        r = out["results"][t]
        res[t] = {k.split(",")[0]: v for k, v in r.items() if "," in k and isinstance(v, float)}
    return {"engine": engine, "seconds": seconds, "requests": counted["n"], "results": res}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--tasks", default=ALL)
    ap.add_argument("--batch", type=int, default=8, help="torch batch (both engines)")
    ap.add_argument(
        "--engines",
        default="lm-eval hf,cllm torch,cllm llama.cpp",
        help="also: 'lm-eval gguf http' (lm-eval's HTTP client against llama-cpp-python's "
        "server, from bench/peers/setup_llamacpp_server.sh)",
    )
    args = ap.parse_args()
    from cllm.formats.aliases import resolve

    folder = resolve("smollm2-135m")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    rows = []
    for engine in [e.strip() for e in args.engines.split(",")]:
        print(f"running {engine} ...", file=sys.stderr, flush=True)
        rows.append(run_engine(engine, folder, tasks, args.limit, args.batch))
    ref = rows[0]["results"]
    table = []
    for r in rows:
        for t in tasks:
            for metric in ("acc", "acc_norm"):
                if metric not in r["results"][t]:
                    continue
                v = r["results"][t][metric]
                diff = (v - ref[t][metric]) * 100
                table.append([r["engine"], t, metric, f"{v:.4f}", f"{diff:+.2f}"])
    print_table(
        f"Task accuracy, SmolLM2-135M, --limit {args.limit} (diff in points vs {rows[0]['engine']})",
        ["engine", "task", "metric", "value", "diff"],
        table,
    )
    print()
    print_table(
        "Task evaluation speed (loglikelihood requests per second)",
        ["engine", "requests", "seconds", "requests/s"],
        [[r["engine"], str(r["requests"]), f"{r['seconds']:.1f}", f"{r['requests'] / r['seconds']:.1f}"]
         for r in rows],
    )  # fmt: skip
    out = write_results("tasks", rows, {"limit": args.limit, "tasks": tasks})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
