#!/usr/bin/env python
"""Prune an HF model with llm-compressor's Wanda / SparseGPT modifiers (peer baseline).

Run with the PEER venv's python (bench/peers/llmcompressor/.venv/bin/python, made by
setup_llmcompressor.sh), never with cllm's venv:

    python llmcompressor_prune.py --model HF_FOLDER --calib-ids IDS.npy \
        --method wanda|sparsegpt --sparsity 0.5 [--pattern 2:4] \
        --out OUT_FOLDER --json RESULT.json [--threads 2]

- The calibration set is exactly the given token ids (numpy int64 [samples, seqlen]),
  turned into a datasets.Dataset with input_ids / attention_mask (all ones), fed in
  file order (no shuffling), batch size 1, no truncation.
- Pruned: every q/k/v/o/gate/up/down_proj Linear inside the decoder layers; never
  lm_head (tied to the embeddings on SmolLM2) nor embeddings.
- "seconds" is the wall time of the llmcompressor.oneshot(...) call alone
  (time.perf_counter); "cpu_seconds" its process CPU time (user+sys, all threads),
  less sensitive to other load on the machine; loading and saving are reported
  separately, as are the load averages at start and end.
- The pruned model is saved dense (save_compressed=False): plain fp32 safetensors with
  exact zeros; tokenizer files are copied from the input folder.
- On any failure, RESULT.json gets "error" = exception type, message and the last
  traceback lines, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import sys
import time
import traceback
from pathlib import Path

# Nothing may be fetched from a hub: everything is local.
for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TARGET_REGEX = r"re:.*layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"
LINEAR_NAME = re.compile(r".*layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="fp32 HF folder (config.json + safetensors)")
    p.add_argument("--calib-ids", required=True, help=".npy int64 [samples, seqlen] token ids")
    p.add_argument("--method", required=True, choices=["wanda", "sparsegpt"])
    p.add_argument(
        "--sparsity", type=float, default=0.5, help="unstructured target (ignored by 2:4)"
    )
    p.add_argument("--pattern", default=None, help="N:M mask, e.g. 2:4 (default: unstructured)")
    p.add_argument("--out", required=True, help="output HF folder (dense safetensors)")
    p.add_argument("--json", required=True, help="result JSON path")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument(
        "--dampening-frac",
        type=float,
        default=0.01,
        help="SparseGPT only (llm-compressor default 0.01)",
    )
    p.add_argument(
        "--block-size", type=int, default=128, help="SparseGPT only (llm-compressor default 128)"
    )
    return p.parse_args(argv)


def _error_text(exc: BaseException) -> str:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    tail = "".join(tb).rstrip().splitlines()[-12:]
    return (
        f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}\n--- traceback (last lines) ---\n"
        + "\n".join(tail)
    )


def _linear_sparsity(model):
    """(fraction of exact zeros, number of linears, parameters) over the pruned linears."""
    import torch

    zeros = total = n_lin = 0
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and LINEAR_NAME.match(name):
                zeros += int((mod.weight == 0).sum())
                total += mod.weight.numel()
                n_lin += 1
    if n_lin == 0:
        raise RuntimeError("no q/k/v/o/gate/up/down_proj Linear found in the model")
    return zeros / total, n_lin, total


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv=None) -> int:
    args = parse_args(argv)
    pattern = args.pattern or "0:0"
    result = {
        "tool": "llm-compressor",
        "version": None,
        "method": args.method,
        "sparsity": args.sparsity,
        "pattern": args.pattern,
        "seconds": None,
        "achieved_sparsity": None,
        "error": None,
        # extras
        "cpu_seconds": None,
        "model": str(args.model),
        "out": str(args.out),
        "calib_shape": None,
        "threads": args.threads,
        "modifier": None,
        "pruned_linears": None,
        "pruned_params": None,
        "input_sparsity": None,
        "saved_sparsity": None,
        "load_seconds": None,
        "save_seconds": None,
        "total_seconds": None,
        "peak_rss_mb": None,
        "loadavg_start": list(os.getloadavg()),
        "loadavg_end": None,
        "versions": {},
        "stage": "import",
    }
    t_total = time.perf_counter()
    json_path = Path(args.json)

    def write():
        result["total_seconds"] = round(time.perf_counter() - t_total, 3)
        result["peak_rss_mb"] = round(_peak_rss_mb(), 1)
        result["loadavg_end"] = list(os.getloadavg())
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")

    try:
        import numpy as np
        import torch

        torch.set_num_threads(args.threads)
        import compressed_tensors
        import datasets
        import llmcompressor
        import transformers
        from llmcompressor import oneshot

        if args.method == "wanda":
            from llmcompressor.modifiers.pruning import WandaPruningModifier as Mod
        else:
            from llmcompressor.modifiers.pruning import SparseGPTModifier as Mod

        result["version"] = getattr(llmcompressor, "__version__", None)
        result["versions"] = {
            "llmcompressor": result["version"],
            "compressed_tensors": getattr(compressed_tensors, "__version__", None),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "datasets": datasets.__version__,
            "numpy": np.__version__,
            "python": sys.version.split()[0],
        }

        result["stage"] = "calibration-data"
        ids = np.load(args.calib_ids)
        if ids.ndim != 2:
            raise ValueError(
                f"--calib-ids must be a 2-D array [samples, seqlen], got shape {ids.shape}"
            )
        ids = ids.astype(np.int64, copy=False)
        n_samples, seqlen = ids.shape
        result["calib_shape"] = [int(n_samples), int(seqlen)]
        ds = datasets.Dataset.from_dict(
            {"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist()}
        )

        result["stage"] = "load"
        t0 = time.perf_counter()
        model = transformers.AutoModelForCausalLM.from_pretrained(
            args.model, dtype=torch.float32, device_map=None
        )
        model.eval()
        result["load_seconds"] = round(time.perf_counter() - t0, 3)
        result["input_sparsity"] = _linear_sparsity(model)[0]

        result["stage"] = "recipe"
        kw = dict(
            sparsity=args.sparsity,
            mask_structure=pattern,
            targets=[TARGET_REGEX],
            ignore=["re:.*lm_head"],
        )
        if args.method == "sparsegpt":
            kw.update(dampening_frac=args.dampening_frac, block_size=args.block_size)
        modifier = Mod(**kw)
        result["modifier"] = {"class": type(modifier).__name__, **kw}

        result["stage"] = "oneshot"
        c0 = time.process_time()
        t0 = time.perf_counter()
        model = oneshot(
            model=model,
            tokenizer=args.model,
            dataset=ds,
            recipe=[modifier],
            num_calibration_samples=int(n_samples),
            shuffle_calibration_samples=False,
            max_seq_length=int(seqlen),
            batch_size=1,
        )
        result["seconds"] = round(time.perf_counter() - t0, 3)
        result["cpu_seconds"] = round(time.process_time() - c0, 3)

        result["stage"] = "measure"
        sparsity, n_lin, total = _linear_sparsity(model)
        result["pruned_linears"] = n_lin
        result["pruned_params"] = total
        result["achieved_sparsity"] = sparsity

        result["stage"] = "save"
        t0 = time.perf_counter()
        out = Path(args.out)
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        model.save_pretrained(str(out), save_compressed=False)
        src = Path(args.model)
        for fn in TOKENIZER_FILES:
            if (src / fn).is_file() and not (out / fn).exists():
                shutil.copy2(src / fn, out / fn)
        result["save_seconds"] = round(time.perf_counter() - t0, 3)

        # Re-read what was written: dense tensors with exact zeros.
        result["stage"] = "verify-saved"
        from safetensors import safe_open

        zeros = total = n_lin = 0
        for f in sorted(out.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():  # noqa: SIM118 - safe_open is not iterable
                    if key.endswith(".weight") and LINEAR_NAME.match(key[: -len(".weight")]):
                        t = sf.get_tensor(key)
                        zeros += int((t == 0).sum())
                        total += t.numel()
                        n_lin += 1
        if n_lin != result["pruned_linears"]:
            raise RuntimeError(
                f"saved folder holds {n_lin} pruned linears as plain .weight tensors, "
                f"expected {result['pruned_linears']} (not a dense checkpoint?)"
            )
        result["saved_sparsity"] = zeros / total
        result["stage"] = "done"
    except BaseException as exc:  # noqa: BLE001 - record exactly what failed
        result["error"] = _error_text(exc)
        write()
        print(result["error"], file=sys.stderr)
        return 1

    write()
    print(
        json.dumps(
            {
                k: result[k]
                for k in ("tool", "version", "method", "pattern", "seconds", "achieved_sparsity")
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
