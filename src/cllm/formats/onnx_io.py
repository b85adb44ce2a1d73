"""ONNX decoders: building them with onnxruntime-genai's model builder, running them with
onnxruntime (the decoder loop lives in `cllm.standalone.runner`, which bundles ship to
boards), and the provenance they carry.

An ONNX export is a folder (by convention named `*.onnx`) holding `model.onnx`, its external
weights (`model.onnx.data`), `genai_config.json` and the tokenizer files, which is what
onnxruntime-genai's model builder writes. The graph is a causal LM with a KV cache:
inputs `input_ids`, `attention_mask` and `past_key_values.<i>.key/value`; outputs `logits`
and `present.<i>.key/value` ([batch, kv_heads, seq, head_dim]).

The builder is used rather than `torch.onnx.export` because it emits onnxruntime's fused
CPU operators (GroupQueryAttention, SkipSimplifiedLayerNormalization, MatMulNBits), which
the speed of generation depends on, and it handles the cache layout onnxruntime expects.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from cllm.errors import InputError, NativeCrash, RuntimeFailure, UsageError
from cllm.standalone.runner import MODEL_FILE, OnnxDecoder

PROVENANCE_KEY = "cllm.provenance"
SIDE_FILE = "cllm.json"  # provenance and export facts, readable without onnx installed


def is_onnx(path: Path) -> bool:
    p = Path(path)
    return (p.is_dir() and (p / MODEL_FILE).is_file()) or (p.is_file() and p.suffix == ".onnx")


def model_file(path: Path) -> Path:
    p = Path(path)
    if p.is_dir():
        f = p / MODEL_FILE
        if not f.is_file():
            raise InputError(f"{p} has no {MODEL_FILE}", "Pass an ONNX export folder or .onnx file")
        return f
    return p


def run_builder(
    hf_dir: Path,
    out_dir: Path,
    precision: str,
    extra: dict[str, str],
    cache_dir: Path,
    log_file: Path,
) -> None:
    """onnxruntime-genai's model builder in a child process (it prints to stdout and edits
    sys.path on import): its output goes to `log_file`, whose last line explains a failure.

    fp16 graphs are built for the builder's GPU target: the same fused GroupQueryAttention
    graph, which onnxruntime's CPU provider also runs. The builder's CPU-target fp16 graph
    (unfused attention) fails in onnxruntime 1.32 once a KV cache is fed (a Cast reuses a
    buffer of the wrong shape). The session options that name the GPU provider are removed,
    so the export stays provider-neutral; bundles name the provider for their board.
    """
    target = "cuda" if precision == "fp16" else "cpu"
    cmd = [
        sys.executable, "-m", "cllm.formats.genai_builder",
        "-i", str(hf_dir), "-o", str(out_dir), "-p", precision, "-e", target, "-c", str(cache_dir),
    ]  # fmt: skip
    # full-length KV caches on sliding-window layers too: cllm's decoder loop (and the board
    # runner) feeds every layer the same cache layout; the window is applied by attention
    extra = {"windowed_kv_cache": "false", **extra}
    cmd += ["--extra_options", *(f"{k}={v}" for k, v in extra.items())]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log_file, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode < 0:
        raise NativeCrash("onnxruntime-genai's model builder", "exporting to ONNX", proc.returncode)
    if proc.returncode != 0:
        lines = [
            ln.strip() for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()
        ]
        last = lines[-1] if lines else f"exit code {proc.returncode}"
        if "is not currently supported" in last:
            arch = json.loads((Path(hf_dir) / "config.json").read_text()).get(
                "architectures", ["?"]
            )
            raise UsageError(
                f"architecture {arch[0]} cannot be exported to ONNX",
                "onnxruntime-genai's model builder does not support it",
            )
        if "No module named" in last and "onnxruntime_genai" in last:
            raise UsageError("ONNX export needs onnxruntime-genai", "pip install 'cllm[onnx]'")
        raise RuntimeFailure(
            f"ONNX model builder failed: {last}", f"full log: {_keep_log(log_file)}"
        )
    if target != "cpu":
        cfg_file = out_dir / "genai_config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg["model"]["decoder"].setdefault("session_options", {})["provider_options"] = []
        cfg_file.write_text(json.dumps(cfg, indent=4))


def _keep_log(log_file: Path) -> Path:
    """A copy of a failed build's log outside the work folder, which is removed on the way out."""
    import shutil
    import tempfile

    fd, name = tempfile.mkstemp(prefix="cllm-onnx-builder-", suffix=".log")
    os.close(fd)
    shutil.copyfile(log_file, name)
    return Path(name)


# onnxruntime operators that graphs use in the default ONNX domain although the ONNX standard
# has no such operator (onnxruntime registers them there); the standard checker cannot know them
_ORT_OPS_IN_DEFAULT_DOMAIN = ("SimplifiedLayerNormalization",)


def check_graph(path: Path) -> None:
    """onnx.checker over the whole graph, with onnxruntime's own operators set aside.

    The checker validates the graph's structure, every standard operator's spec, initializers
    and their external data; the operators only onnxruntime defines (com.microsoft, and the
    few it registers in the default domain) are left to onnxruntime, which every export is
    also loaded and run in. (Not `full_check`: its strict shape inference rejects a scalar
    constant the builder declares with shape [1], which onnxruntime accepts.)
    """
    import onnx

    model = onnx.load(str(model_file(path)), load_external_data=False)
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx") and node.op_type in _ORT_OPS_IN_DEFAULT_DOMAIN:
            node.domain = "com.microsoft"
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.add(domain="com.microsoft", version=1)
    # checked by path, beside the original, so the external weights are found and checked too
    probe = model_file(path).with_name(".cllm-check.onnx")
    try:
        onnx.save(model, str(probe))
        onnx.checker.check_model(str(probe), check_custom_domain=False)
    except onnx.checker.ValidationError as exc:
        raise RuntimeFailure(f"ONNX graph fails the checker: {str(exc).splitlines()[0]}") from exc
    finally:
        probe.unlink(missing_ok=True)


def write_provenance(folder: Path, provenance: dict[str, Any], facts: dict[str, Any]) -> None:
    """Provenance into the graph's metadata_props (what onnx tools show) and a side file."""
    import onnx

    path = folder / MODEL_FILE
    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p for p in model.metadata_props}
    text = json.dumps(provenance, sort_keys=True)
    if PROVENANCE_KEY in props:
        props[PROVENANCE_KEY].value = text
    else:
        entry = model.metadata_props.add()
        entry.key, entry.value = PROVENANCE_KEY, text
    onnx.save(model, str(path))  # external data stays where it is: only the graph is rewritten
    (folder / SIDE_FILE).write_text(json.dumps({"provenance": provenance, **facts}, indent=1))


def read_side_file(path: Path) -> dict[str, Any]:
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    try:
        data = json.loads((folder / SIDE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def open_decoder(path: Path, threads: int = 0) -> OnnxDecoder:
    """The decoder at `path` in onnxruntime, with a load failure reported as bad input."""
    try:
        return OnnxDecoder(model_file(path).parent if Path(path).is_dir() else path, threads)
    except ImportError as exc:
        raise UsageError("ONNX needs onnxruntime", "pip install 'cllm[onnx]'") from exc
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph types
        raise InputError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0]}") from exc


class OnnxCheckpoint:
    """An ONNX export seen where a checkpoint is expected for evaluation: its tokenizer, hash
    and name (its weights are only reachable through onnxruntime)."""

    format = "onnx"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        model_file(self.path)  # a folder without model.onnx is bad input

    def tokenizer_dir(self) -> Path:
        folder = self.path if self.path.is_dir() else self.path.parent
        if not (folder / "tokenizer.json").is_file():
            raise InputError(f"{self.path} has no tokenizer.json beside the graph")
        return folder

    @property
    def display_name(self) -> str:
        return str(self.path)

    @property
    def sha256(self) -> str:
        from cllm.formats.hashing import artifact_files, files_sha256

        return files_sha256(artifact_files(self.path))
