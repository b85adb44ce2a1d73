"""Run a decoder one layer at a time over calibration activations.

Only one decoder layer's weights and the hidden states of the calibration set are
in memory at once; each layer's inputs come from the already-processed (e.g.
quantized) previous layers, which is what GPTQ and AWQ need.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from cllm.errors import InputError
from cllm.formats.checkpoint import Checkpoint


def _config(ckpt: Checkpoint) -> Any:
    from transformers import AutoConfig

    logging.getLogger("transformers").setLevel(logging.ERROR)
    cfg = {
        k: v
        for k, v in ckpt.config.items()
        if k not in ("quantization_config", "transformers_version")
    }
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise InputError(f"{ckpt.path}: config has no model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    config._attn_implementation = "sdpa"
    return config


class LayerRunner:
    """Builds decoder layer i from the checkpoint's tensors and runs it on batches."""

    def __init__(self, ckpt: Checkpoint, batch_size: int = 8, compute_dtype: str = "fp32") -> None:
        from transformers import AutoModelForCausalLM

        from cllm.core.layer_call import LayerCall
        from cllm.formats.arch import spec_for_config

        self.spec = spec_for_config(ckpt.config)
        self.ckpt = ckpt
        self.config = _config(ckpt)
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32)
        self.n_layers = int(self.config.num_hidden_layers)
        self.batch_size = batch_size
        self.compute_dtype = compute_dtype
        rotary_cls = type(self.skeleton.model.rotary_emb)
        self.rotary = rotary_cls(config=self.config)
        self.call = LayerCall(self.config, self.rotary, self.spec)

    def layer_prefix(self, i: int) -> str:
        return f"model.layers.{i}."

    @staticmethod
    def index_of(layer: torch.nn.Module) -> int:
        return int(layer._cllm_layer_index)  # type: ignore[arg-type]

    def build_layer(self, i: int) -> torch.nn.Module:
        layer = self.skeleton.model.layers[i]
        prefix = self.layer_prefix(i)
        state = {
            name[len(prefix) :]: self.ckpt.get(name).float()
            for name in self.ckpt.tensor_infos()
            if name.startswith(prefix)
        }
        missing, unexpected = layer.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise InputError(
                f"layer {i}: tensors do not match the architecture (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        layer._cllm_layer_index = i  # which RoPE / mask it takes (see layer_kwargs)
        return layer.eval()

    def release_layer(self, i: int) -> None:
        """Put the layer back on the meta device so its weights are freed."""
        self.skeleton.model.layers[i] = self.skeleton.model.layers[i].to_empty(device="meta")

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        from cllm.core.layer_call import embed_scale

        weight = self.ckpt.get("model.embed_tokens.weight").float()
        out = torch.nn.functional.embedding(ids, weight)
        scale = embed_scale(self.spec, self.config)
        return out if scale is None else out * torch.tensor(scale, dtype=out.dtype)

    def layer_kwargs(self, layer: torch.nn.Module, hidden: torch.Tensor) -> dict[str, Any]:
        """What the model's own forward would pass this layer besides its input."""
        return self.call.kwargs(self.index_of(layer), hidden)

    def batches(
        self, layer: torch.nn.Module, hidden: torch.Tensor
    ) -> Iterator[tuple[slice, Callable[[], Any]]]:
        """(rows, run) per calibration batch; `run()` is the layer's forward on those rows."""
        kwargs = self.layer_kwargs(layer, hidden)
        bf16 = self.compute_dtype == "bf16"
        for b in range(0, hidden.shape[0], self.batch_size):
            rows = slice(b, b + self.batch_size)

            def run(x: torch.Tensor = hidden[rows]) -> Any:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    return layer(x, **kwargs)

            yield rows, run

    @torch.inference_mode()
    def forward(
        self,
        layer: torch.nn.Module,
        hidden: torch.Tensor,
        on_batch: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """Run every calibration sample through one layer, in batches."""
        out = torch.empty_like(hidden)
        for rows, run in self.batches(layer, hidden):
            y = run()
            out[rows] = y[0] if isinstance(y, tuple) else y
            if on_batch:
                on_batch()
        return out

    @torch.inference_mode()
    def feed(self, layer: torch.nn.Module, hidden: torch.Tensor, stop: type[Exception]) -> None:
        """Run every calibration batch into the layer for its hooks only; a hook raising
        `stop` ends that batch early (the outputs are not kept)."""
        for _rows, run in self.batches(layer, hidden):
            with contextlib.suppress(stop):
                run()


def resolve_compute_dtype(requested: str) -> str:
    """'auto' means bf16 where the CPU has native bf16 matmul (about 2.4x faster here), else fp32.

    Calibration forward passes only gather statistics, so bf16 activations are the usual
    practice (the reference GPTQ runs them in fp16); Hessians are accumulated in fp32.
    """
    if requested != "auto":
        return requested
    try:
        return "bf16" if bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) else "fp32"
    except (AttributeError, RuntimeError):
        return "fp32"


def linear_modules(layer: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The layer's Linear modules by name relative to the layer, in execution order."""
    return {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


LayerWork = Callable[
    [LayerRunner, int, torch.nn.Module, torch.Tensor],
    tuple[dict[str, Any], dict[str, torch.Tensor] | None],
]


def drive_layers(
    ckpt: Checkpoint,
    ids: torch.Tensor,
    store: Any,
    work: LayerWork,
    *,
    batch_size: int,
    compute_dtype: str,
    resume: bool = False,
    on_layer: Callable[[int, int], None] | None = None,
    outputs: Callable[[], torch.Tensor | None] | None = None,
) -> Any:
    """The loop GPTQ, AWQ and pruning share: build layer i, let `work` quantize it in place,
    run the quantized layer to get layer i+1's inputs, save results and hidden states (what
    `--resume` restarts from), free the layer. `outputs()` hands over layer i's outputs when
    `work` already computed them (pruning in one pass), so the layer is not run again."""
    runner = LayerRunner(
        ckpt, batch_size=batch_size, compute_dtype=resolve_compute_dtype(compute_dtype)
    )
    start = store.open(resume)
    hidden = store.load_hidden() if start > 0 else runner.embed(ids)
    for i in range(start, runner.n_layers):
        layer = runner.build_layer(i)
        results, dense = work(runner, i, layer, hidden)
        done = outputs() if outputs is not None else None
        # the next layer sees the quantized layer's outputs
        hidden = done if done is not None else runner.forward(layer, hidden)
        store.save_layer(i, results, hidden, dense)
        runner.release_layer(i)
        if on_layer:
            on_layer(i, runner.n_layers)
    return store
