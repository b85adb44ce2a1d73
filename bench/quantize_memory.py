"""Peak memory of RTN to GGUF on a model with 1B-parameter shapes (random weights, built here).

The model (Llama-3.2-1B shapes: hidden 2048, 16 layers, MLP 8192, vocab 128256, tied
embeddings; 1.24B parameters, 4.9 GB of fp32 safetensors) is written tensor by tensor, then
`cllm quantize DIR --gguf-type Q4_0` runs as a child process whose peak RSS is read from
getrusage. Target: peak RSS <= 3 x the largest tensor + 500 MB.

    python bench/quantize_memory.py --gguf-type Q4_0
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, write_results  # noqa: E402

SHAPES = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
}


def build(folder: Path) -> int:
    """Write the random model; return the size of its largest tensor in bytes."""
    import torch
    from transformers import LlamaConfig

    from cllm.formats.arch.families import LLAMA
    from cllm.formats.safetensors_io import PlannedTensor, write_safetensors_file
    from cllm.testing.tiny import tiny_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(**SHAPES).to_dict()
    (folder / "config.json").write_text(json.dumps(cfg))
    tiny_tokenizer().save_pretrained(folder)
    shapes = {
        n: s
        for n, s in LLAMA.expected_shapes(cfg).items()
        if not n.endswith(".bias") and n != "lm_head.weight"
    }
    gen = torch.Generator().manual_seed(0)

    def produce(shape: tuple[int, ...]) -> torch.Tensor:
        if len(shape) == 1:
            return torch.ones(shape)
        return torch.randn(shape, generator=gen) * 0.02

    plans = [PlannedTensor(n, s, "F32", lambda s=s: produce(s)) for n, s in shapes.items()]
    write_safetensors_file(folder / "model.safetensors", plans, {"format": "pt"})
    return max(4 * s[0] * (s[1] if len(s) > 1 else 1) for s in shapes.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gguf-type", default="Q4_0")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cllm-mem-"))
    t0 = time.perf_counter()
    largest = build(tmp / "model-1b")
    build_s = time.perf_counter() - t0
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    cmd = [
        sys.executable,
        "-m",
        "cllm",
        "quantize",
        str(tmp / "model-1b"),
        "--gguf-type",
        args.gguf_type,
        "-o",
        str(tmp / "out.gguf"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kb <= before:
        raise SystemExit("could not read the child's peak RSS")
    peak = peak_kb * 1024
    limit = 3 * largest + 500 * 1024**2
    row = {
        "gguf_type": args.gguf_type,
        "params": 1_235_814_400,
        "largest_tensor_bytes": largest,
        "peak_rss_bytes": peak,
        "limit_bytes": limit,
        "met": peak <= limit,
        "quantize_wall_s": wall,
        "build_s": build_s,
        "output_bytes": (tmp / "out.gguf").stat().st_size,
    }
    print_table(
        "RTN to GGUF, 1B-shaped random Llama",
        ["type", "largest tensor", "peak RSS", "limit (3x + 500 MB)", "met", "wall s"],
        [
            [
                args.gguf_type,
                f"{largest / 1e9:.2f} GB",
                f"{peak / 1e9:.2f} GB",
                f"{limit / 1e9:.2f} GB",
                "yes" if row["met"] else "NO",
                f"{wall:.1f}",
            ]
        ],
    )
    print(f"\nwrote {write_results('quantize_memory', [row], {'params': vars(args)})}")


if __name__ == "__main__":
    main()
