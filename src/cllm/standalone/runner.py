"""Benchmark one model in this process and print one JSON record (schema `cllm.bench/1`).

Standalone on purpose: it imports only the standard library, numpy, the runtime it drives
(llama-cpp-python for GGUF, onnxruntime for ONNX; torch + transformers for the torch
backend), `guard.py` beside it (how to load llama.cpp safely on this CPU) and `energy.py`
beside it (power meters; optional: without it there are no energy figures), so `cllm bench`
runs it in a child process (peak memory of one run, no state shared between runs) and an
edge bundle ships it as `bench.py` to run on a board.

    python runner.py MODEL --backend llama.cpp --threads 4 --prompt 128 --gen 64 --repeat 5

What it measures, per repeat after `--warmup` untimed runs: prompt processing (one batch of
`--prompt` tokens into an empty cache), then `--gen` greedy decode steps of one token each.
Reported: load time, prompt tokens/s, generation tokens/s, time to first token (the prompt
pass, which yields the first new token's logits), per-token decode latency percentiles, and
the process's peak resident memory. Token ids are synthetic and fixed (speed does not depend
on which tokens they are), so no tokenizer is needed.

Where the machine reports power (RAPL on x86, INA3221 on a Jetson, `vcgencmd` on a
Raspberry Pi 5; see `energy.py`), the timed runs also give joules per token: the average
power over each phase (prompt, generation) times that phase's time, per token. Only then
does the record have an `energy` field. `CLLM_SYSFS_ROOT` points the meters at another
root than "/" (tests use a fixture folder).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

if __package__:  # run as part of cllm (`python -m cllm.standalone.runner`, or imported)
    from cllm.standalone import energy, guard
else:  # a bundle's bench.py or a remote copy: guard.py and energy.py are shipped beside it
    import guard  # type: ignore[no-redef]

    try:
        import energy  # type: ignore[no-redef]
    except ImportError:  # a copy made without it: no energy figures
        energy = None  # type: ignore[assignment]

SCHEMA = "cllm.bench/1"
MODEL_FILE = "model.onnx"


def prompt_ids(n: int, vocab: int) -> list[int]:
    """A fixed, vocabulary-spread token sequence (no special tokens at the low ids)."""
    span = max(vocab - 300, 1)
    return [256 + (i * 7919) % span if vocab > 556 else (i * 31) % vocab for i in range(n)]


class LlamaCppModel:
    runtime = "llama.cpp"

    def __init__(self, path: str, threads: int, ctx: int, batch: int) -> None:
        import llama_cpp

        self.version = getattr(llama_cpp, "__version__", "?")
        self.llm = guard.load_llama(
            path, n_ctx=ctx, n_batch=batch, n_ubatch=batch, n_threads=threads,
            n_threads_batch=threads, logits_all=False, verbose=False,
        )  # fmt: skip
        self.vocab = int(self.llm.n_vocab())
        self._logits_ith = llama_cpp.llama_get_logits_ith  # looked up once, not per token

    def prefill(self, ids: list[int]) -> int:
        self.llm.reset()
        self.llm.eval(ids)
        return self._argmax()

    def step(self, tok: int) -> int:
        self.llm.eval([tok])
        return self._argmax()

    def _argmax(self) -> int:
        ptr = self._logits_ith(self.llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.vocab,))))

    def close(self) -> None:
        self.llm.close()


class OnnxDecoder:
    """An onnxruntime session over a decoder with a KV cache (`past_key_values.<i>.key/value`
    in, `present.<i>.key/value` out, [batch, kv_heads, seq, head_dim]), the cache kept here."""

    runtime = "onnxruntime"

    def __init__(
        self, path: str | Path, threads: int = 0, providers: list[str] | None = None
    ) -> None:
        import onnxruntime as ort

        self.version = ort.__version__
        p = Path(path)
        self.path = p
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        model = p / MODEL_FILE if p.is_dir() else p
        available = set(ort.get_available_providers())
        wanted = [p for p in (providers or []) if p in available] or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(model), opts, providers=wanted)
        self.providers = self.session.get_providers()
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = sorted(
            (n for n in self.inputs if n.startswith("past_key_values.")), key=_layer_key
        )
        if "input_ids" not in self.inputs or not self.past_names:
            raise ValueError(
                f"{p} is not a decoder with a KV cache (inputs: {', '.join(self.inputs)})"
            )
        shape = self.inputs[self.past_names[0]].shape  # [batch, kv_heads, past, head_dim]
        self.kv_heads = self._dim(shape[1], "num_key_value_heads", model)
        self.head_dim = self._dim(shape[3], "head_size", model)
        half = "float16" in self.inputs[self.past_names[0]].type
        self.float_type = np.float16 if half else np.float32
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.vocab = int(self.session.get_outputs()[0].shape[-1])
        self.cache: dict[str, np.ndarray] = self.empty_cache()

    @staticmethod
    def _dim(value: Any, key: str, model: Path) -> int:
        """A cache dimension: fixed in the graph, or named there and given by the
        genai_config.json beside it (the model builder leaves head size symbolic)."""
        if isinstance(value, int):
            return value
        try:
            cfg = json.loads((model.parent / "genai_config.json").read_text())
            return int(cfg["model"]["decoder"][key])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{model}: KV cache dimension {value!r} is symbolic and no genai_config.json "
                f"gives {key}"
            ) from exc

    def empty_cache(self, batch: int = 1) -> dict[str, np.ndarray]:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return {n: np.zeros(shape, dtype=self.float_type) for n in self.past_names}

    def run(
        self, ids: Any, cache: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Feed `ids` [batch, new] after the cached positions: (float32 logits
        [batch, new, vocab], the cache extended by the new positions)."""
        ids = np.asarray(ids, dtype=np.int64)
        past = next(iter(cache.values())).shape[2] if cache else 0
        total = past + ids.shape[1]
        feed: dict[str, np.ndarray] = {"input_ids": ids, **cache}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = np.ones((ids.shape[0], total), dtype=np.int64)
        if "position_ids" in self.inputs:
            pos = np.arange(past, total, dtype=np.int64)[None]
            feed["position_ids"] = pos.repeat(ids.shape[0], axis=0)
        out = dict(zip(self.outputs, self.session.run(self.outputs, feed), strict=True))
        new = {n: out[n.replace("past_key_values.", "present.")] for n in self.past_names}
        return out["logits"].astype(np.float32, copy=False), new

    def logits(self, ids: Any) -> np.ndarray:
        ids = np.asarray(ids)
        return self.run(ids[None] if ids.ndim == 1 else ids, self.empty_cache())[0]

    def greedy(self, prompt: list[int], n: int, use_cache: bool = True) -> list[int]:
        """`n` greedy tokens after `prompt`: incrementally through the cache, or (`use_cache`
        off) by re-running the whole sequence for every token."""
        seq, cache, pending = list(prompt), self.empty_cache(), list(prompt)
        for _ in range(n):
            if use_cache:
                logits, cache = self.run([pending], cache)
            else:
                logits, _ = self.run([seq], self.empty_cache())
            seq.append(int(np.argmax(logits[0, -1])))
            pending = seq[-1:]
        return seq[len(prompt) :]

    # the benchmark protocol
    def prefill(self, ids: list[int]) -> int:
        logits, self.cache = self.run([ids], self.empty_cache())
        return int(np.argmax(logits[0, -1]))

    def step(self, tok: int) -> int:
        logits, self.cache = self.run([[tok]], self.cache)
        return int(np.argmax(logits[0, -1]))

    def close(self) -> None:
        self.session = None


class TorchModel:
    runtime = "torch"

    def __init__(self, path: str, threads: int) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.version = torch.__version__
        try:  # cllm's reader takes every format it knows (GGUF, single-file, packed)
            from cllm.core.eval.backends import build_torch_model
            from cllm.formats.checkpoint import open_checkpoint

            self.model = build_torch_model(open_checkpoint(path))
        except ImportError:
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        self.model.eval()
        self.vocab = int(self.model.config.vocab_size)
        self.past: Any = None

    def _forward(self, ids: list[int]) -> int:
        with self.torch.inference_mode():
            out = self.model(self.torch.tensor([ids]), past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def prefill(self, ids: list[int]) -> int:
        self.past = None
        return self._forward(ids)

    def step(self, tok: int) -> int:
        return self._forward([tok])

    def close(self) -> None:
        self.model = None


def _layer_key(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return (int(parts[1]), parts[2]) if len(parts) > 2 and parts[1].isdigit() else (0, name)


def detect_backend(path: str) -> str:
    p = Path(path)
    if p.suffix == ".gguf" and p.is_file():
        return "llama.cpp"
    if (p.is_dir() and (p / MODEL_FILE).is_file()) or p.suffix == ".onnx":
        return "onnxruntime"
    return "torch"


def load(
    path: str, backend: str, threads: int, ctx: int, batch: int, providers: list[str] | None = None
) -> Any:
    if backend == "llama.cpp":
        return LlamaCppModel(path, threads, ctx, batch)
    if backend == "onnxruntime":
        return OnnxDecoder(path, threads, providers)
    if backend == "torch":
        return TorchModel(path, threads)
    raise ValueError(f"unknown backend {backend!r}: use llama.cpp, onnxruntime or torch")


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def measure(model: Any, prompt: int, gen: int, meter: Any = None) -> dict[str, Any]:
    """One run's timings; with a `meter`, also the average watts over the prompt pass and
    over the decode steps (None where the meter gave nothing)."""
    ids = prompt_ids(prompt, model.vocab)
    clock = time.perf_counter
    if meter is not None:
        meter.start()
    t0 = clock()
    tok = model.prefill(ids)
    t_prefill = clock() - t0
    prefill_w = _watts(meter)
    if meter is not None:
        meter.start()
    lat = []
    for _ in range(gen):
        t = clock()
        tok = model.step(tok)
        lat.append(clock() - t)
    out: dict[str, Any] = {"prefill_s": t_prefill, "step_s": lat}
    if meter is not None:
        out.update(prefill_w=prefill_w, gen_w=_watts(meter))
    return out


def _watts(meter: Any) -> float | None:
    """Stop `meter`: the average power over its interval, if it measured any."""
    if meter is None:
        return None
    joules = meter.stop()
    return joules / meter.seconds if joules > 0 and meter.seconds > 0 else None


def open_meter() -> Any:
    """This machine's power meter (`CLLM_SYSFS_ROOT` stands in for "/"), or None."""
    if energy is None:
        return None
    return energy.open_meter(os.environ.get("CLLM_SYSFS_ROOT") or "/")


def energy_record(
    meter: Any, runs: list[dict[str, Any]], prompt: int, gen: int
) -> dict[str, Any] | None:
    """Joules per token and watts over the timed runs, or None if nothing was measured."""
    if meter is None:
        return None
    gen_w = [r["gen_w"] for r in runs if r.get("gen_w")]
    if not gen_w:
        return None
    rec: dict[str, Any] = {
        "source": meter.source,
        "domains": list(meter.domains),
        "joules_per_token": summary(
            [r["gen_w"] * sum(r["step_s"]) / gen for r in runs if r.get("gen_w")]
        ),
        "watts": statistics.median(gen_w),
    }
    pp_w = [r["prefill_w"] for r in runs if r.get("prefill_w")]
    if pp_w:
        rec["prompt_joules_per_token"] = summary(
            [r["prefill_w"] * r["prefill_s"] / prompt for r in runs if r.get("prefill_w")]
        )
        rec["prompt_watts"] = statistics.median(pp_w)
    return rec


def file_bytes(path: str) -> int:
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


def peak_rss() -> int:
    """This process's peak resident memory in bytes.

    Linux's VmHWM starts afresh at exec; ru_maxrss does not (a child started from a large
    parent would report the parent's size), so it is only the fallback elsewhere.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (
        1 if sys.platform == "darwin" else 1024
    )


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (out.stdout or out.stderr).strip()
    return text if out.returncode == 0 and text else None


def copy_bandwidth(size: int = 256 << 20, runs: int = 5) -> float:
    """Memory copy bandwidth in bytes/s (read + write counted, as STREAM's Copy does), best
    of `runs` numpy copies of `size` bytes: the ceiling generation's weight reads approach."""
    src = np.ones(size // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best


def device_facts() -> dict[str, Any]:
    """What the numbers depend on: CPU, cores, memory, OS; board state where a tool tells it."""
    facts: dict[str, Any] = {
        "hostname": platform.node(),
        "os": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cores": os.cpu_count(),
    }
    try:
        info: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if ":" in line:
                key, value = line.split(":", 1)
                info.setdefault(key.strip().lower(), value.strip())
        # x86: "model name"; ARM boards: "Model" (e.g. the Pi's board name) or "Hardware"
        for key in ("model name", "hardware"):
            if info.get(key):
                facts["cpu"] = info[key]
                break
        if info.get("model") and not info["model"].isdigit():
            facts["board"] = info["model"]
    except OSError:
        pass
    facts.setdefault("cpu", platform.processor() or platform.machine())
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                facts["ram_bytes"] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    throttled = _run(["vcgencmd", "get_throttled"])  # Raspberry Pi firmware
    if throttled:
        facts["throttled"] = throttled
    power = _run(["nvpmodel", "-q"])  # Jetson power mode
    if power:
        facts["power_mode"] = power
    return facts


def bench(
    path: str,
    backend: str,
    threads: int,
    prompt: int,
    gen: int,
    repeat: int,
    warmup: int,
    on_progress: Callable[[str], None] | None = None,
    providers: list[str] | None = None,
) -> dict[str, Any]:
    threads = threads or min(os.cpu_count() or 1, 8)
    t0 = time.perf_counter()
    model = load(path, backend, threads, prompt + gen + 16, max(prompt, 32), providers)
    load_s = time.perf_counter() - t0
    if os.environ.get("CLLM_TEST_CRASH") == model.runtime:  # test hook: die as a bad kernel would
        os.kill(os.getpid(), signal.SIGSEGV)
    meter = open_meter()
    runs = []
    for i in range(warmup + repeat):
        r = measure(model, prompt, gen, meter if i >= warmup else None)
        if i >= warmup:
            runs.append(r)
        if on_progress:
            on_progress(f"run {i + 1}/{warmup + repeat}")
    runtime = {"name": model.runtime, "version": model.version}
    if hasattr(model, "providers"):
        runtime["providers"] = model.providers
    model.close()
    steps = [s for r in runs for s in r["step_s"]]
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "model": str(path),
        "backend": backend,
        "file_bytes": file_bytes(path),
        "threads": threads,
        "prompt": prompt,
        "gen": gen,
        "repeat": repeat,
        "warmup": warmup,
        "load_s": load_s,
        "pp_tps": summary([prompt / r["prefill_s"] for r in runs]),
        "tg_tps": summary([gen / sum(r["step_s"]) for r in runs]),
        "ttft_ms": summary([1000 * r["prefill_s"] for r in runs]),
        "latency_ms": {
            q: 1000 * percentile(steps, v) for q, v in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
        },  # fmt: skip
        "peak_rss_bytes": peak_rss(),
    }
    spent = energy_record(meter, runs, prompt, gen)
    if spent is not None:  # only where the hardware reports power
        record["energy"] = spent
    record["runtime"] = runtime
    record["device"] = {
        **device_facts(),
        "copy_bytes_per_s": copy_bandwidth(),
        "llama_cpp_extra_bufts": guard.decide(),  # AMX usable here? what llama.cpp loaded with
    }
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--backend", default="auto", help="auto, llama.cpp, onnxruntime or torch")
    ap.add_argument("--threads", type=int, default=0, help="0: min(cores, 8)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--providers", default="", help="onnxruntime providers to try in order (comma-separated)"
    )
    args = ap.parse_args(argv)
    providers = [p for p in args.providers.split(",") if p]
    backend = detect_backend(args.model) if args.backend == "auto" else args.backend
    try:
        record = bench(args.model, backend, args.threads, args.prompt, args.gen, args.repeat,
                       args.warmup, lambda s: print(s, file=sys.stderr, flush=True), providers)  # fmt: skip
    except ImportError as exc:
        print(f"bench: error: the {backend} runtime is not installed ({exc})", file=sys.stderr)
        return 4
    except Exception as exc:  # noqa: BLE001 - one line for the caller, whatever the runtime raised
        print(f"bench: error: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        return 1
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
