"""ONNX export and `cllm bench` on SmolLM2-135M: export time, onnxruntime vs llama.cpp speed,
quantized-export quality, and what `cllm bench` adds over a bare llama-cpp-python loop.

    python bench/export_bench.py --repeat 5 --prompt 128 --gen 64 --threads 2

Prints tables and writes bench/results/export_bench.json. Targets (issue 4): ONNX fp32
export <= 2 minutes; ONNX int4 generation >= 0.5 x llama.cpp Q4_0; `cllm bench --backend
llama.cpp` within 3% of a bare llama-cpp-python timing loop on the same GGUF.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cllm, print_table, stats, write_results  # noqa: E402

from cllm.standalone import guard  # noqa: E402

# the bare loop: llama-cpp-python's own calls, nothing of cllm, timed the same way
BARE = """
import sys, time, json, numpy as np, llama_cpp
path, threads, prompt, gen, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
if sys.argv[6] == "0":  # load as cllm does on this CPU (no extra buffer types where AMX is broken)
    _default = llama_cpp.llama_cpp.llama_model_default_params
    def _no_extra():
        p = _default(); p.use_extra_bufts = False; return p
    llama_cpp.llama_cpp.llama_model_default_params = _no_extra
llm = llama_cpp.Llama(model_path=path, n_ctx=prompt + gen + 16, n_batch=prompt, n_ubatch=prompt,
                      n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False)
n_vocab = llm.n_vocab()
ids = [256 + (i * 7919) % (n_vocab - 300) for i in range(prompt)]
def nxt():
    return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))))
out = []
for r in range(runs + 1):
    llm.reset(); llm.eval(ids); tok = nxt()
    t = time.perf_counter()
    for _ in range(gen):
        llm.eval([tok]); tok = nxt()
    if r:
        out.append(gen / (time.perf_counter() - t))
print(json.dumps(out))
"""


def kld_and_diff(model: str, ids: list[int], ref) -> dict:  # type: ignore[no-untyped-def]
    import numpy as np
    import torch

    from cllm.formats.onnx_io import open_decoder

    got = open_decoder(Path(model), threads=2).logits(np.asarray(ids))[0]
    p = torch.log_softmax(torch.as_tensor(ref, dtype=torch.float64), -1)
    q = torch.log_softmax(torch.as_tensor(got, dtype=torch.float64), -1)
    kld = (p.exp() * (p - q)).sum(-1)
    return {
        "max_abs_diff_rel": float(np.abs(got - ref).max() / np.abs(ref).max()),
        "kld_mean": float(kld.mean()),
        "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=256, help="tokens for the logit comparison")
    ap.add_argument("--rounds", type=int, default=10, help="alternations for the overhead check")
    ap.add_argument("--skip-gptq", action="store_true", help="no GPTQ int4 -> exact ONNX row")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cllm-bench-x-"))

    exports = {}
    for name, flags in {
        "fp32": [],
        "fp16": ["--dtype", "fp16"],
        "int8": ["--quant", "int8"],
        "int4": ["--quant", "int4", "--block-size", "32"],
    }.items():
        path, t = cllm(
            "export", "smollm2-135m", "--to", "onnx", *flags, "-o", str(tmp / f"{name}.onnx")
        )
        exports[name] = {"path": path, "export_s": t}
    gguf, t = cllm("quantize", "smollm2-135m", "--gguf-type", "Q4_0", "-o", str(tmp / "q4_0.gguf"))
    exports["Q4_0 gguf"] = {"path": gguf, "export_s": t}
    if not args.skip_gptq:  # cllm's own GPTQ integers carried exactly into MatMulNBits
        q, _ = cllm("quantize", "smollm2-135m", "--method", "gptq", "--bits", "4",
                    "--group-size", "32", "-o", str(tmp / "gptq-int4-g32"))  # fmt: skip
        path, t = cllm("export", q, "--to", "onnx", "--quant", "int4", "-o", str(tmp / "gptq.onnx"))
        exports["int4 (GPTQ)"] = {"path": path, "export_s": t}

    # quality of the ONNX exports against torch on the same tokens (first --tokens of wiki text)
    import torch

    from cllm.core.eval.backends import build_torch_model
    from cllm.core.eval.data import load_tokens
    from cllm.formats.checkpoint import open_checkpoint
    from cllm.paths import default_eval_text

    base = open_checkpoint("smollm2-135m")
    ids = [
        int(i) for i in load_tokens(default_eval_text(), base.tokenizer_dir()).ids[: args.tokens]
    ]
    model = build_torch_model(base)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    del model
    onnx_names = [n for n in exports if n != "Q4_0 gguf"]
    for name in onnx_names:
        exports[name].update(kld_and_diff(exports[name]["path"], ids, ref))

    # speed: one cllm bench call over the GGUF and the ONNX exports
    common = ["--threads", str(args.threads), "--prompt", str(args.prompt), "--gen", str(args.gen),
              "--repeat", str(args.repeat)]  # fmt: skip
    order = ["Q4_0 gguf", *(n for n in exports if n.startswith("int4")), "int8", "fp32", "fp16"]
    out, _ = cllm("bench", *(exports[n]["path"] for n in order), *common, "--json")
    records = {n: json.loads(line) for n, line in zip(order, out.splitlines(), strict=True)}

    # overhead: cllm bench vs the bare loop on the same GGUF, alternating --rounds times (the
    # machine's own drift hits both alike), 3 timed runs each, medians over every run
    ours, bare = [], []
    for _ in range(args.rounds):
        o, _ = cllm("bench", gguf, *common[:-2], "--repeat", "3", "--json")
        ours.append(json.loads(o)["tg_tps"]["median"])
        proc = subprocess.run(
            [sys.executable, "-c", BARE, gguf, str(args.threads), str(args.prompt), str(args.gen), "3",
             str(int(guard.decide()["extra_bufts"]))],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        bare.append(sorted(json.loads(proc.stdout))[1])
    overhead = 1 - stats(ours)["median"] / stats(bare)["median"]

    rows = []
    for name in order:
        r, e = records[name], exports[name]
        rows.append([
            name, f"{r['file_bytes'] / 1e6:.1f}", f"{e['export_s']:.1f}", f"{r['load_s']:.2f}",
            f"{r['pp_tps']['median']:.0f}", f"{r['tg_tps']['median']:.1f}",
            f"{r['ttft_ms']['median']:.0f}", f"{r['latency_ms']['p50']:.1f}/{r['latency_ms']['p90']:.1f}",
            f"{r['peak_rss_bytes'] / 1e6:.0f}",
            f"{r['bandwidth']['fraction_of_copy'] * 100:.0f}%",
            "" if "kld_mean" not in e else f"{e['kld_mean']:.5f}",
            "" if "max_abs_diff_rel" not in e else f"{e['max_abs_diff_rel']:.2e}",
        ])  # fmt: skip
    print_table(
        f"SmolLM2-135M: prompt {args.prompt}, gen {args.gen}, {args.threads} threads, median of {args.repeat}",
        ["model", "MB", "export s", "load s", "pp tok/s", "tg tok/s", "TTFT ms", "p50/p90 ms",
         "peak RSS MB", "BW of copy", "KLD vs torch", "max |diff|/max"],
        rows,
    )  # fmt: skip
    ratio = records["int4"]["tg_tps"]["median"] / records["Q4_0 gguf"]["tg_tps"]["median"]
    checks = [
        {"check": "ONNX fp32 export time, s", "value": exports["fp32"]["export_s"], "limit": 120, "met": exports["fp32"]["export_s"] <= 120},
        {"check": "ONNX int4 tg tok/s / llama.cpp Q4_0 tg tok/s", "value": ratio, "limit": 0.5, "met": ratio >= 0.5},
        {"check": "cllm bench overhead vs bare llama-cpp-python loop", "value": overhead, "limit": 0.03, "met": overhead <= 0.03},
    ]  # fmt: skip
    print()
    print_table("targets", ["check", "value", "limit", "met"],
                [[c["check"], f"{c['value']:.3f}", str(c["limit"]), "yes" if c["met"] else "NO"] for c in checks])  # fmt: skip
    print(f"\nbench tg tok/s: {ours}; bare loop: {bare}")
    result_rows = [{"name": n, **exports[n], "bench": records[n]} for n in order]
    extra = {
        "params": vars(args),
        "checks": checks,
        "overhead": {"cllm_bench": stats(ours), "bare": stats(bare)},
    }
    print(f"\nwrote {write_results('export_bench', result_rows, extra)}")


if __name__ == "__main__":
    main()
