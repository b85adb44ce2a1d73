"""Entry point of the child process that runs onnxruntime-genai's model builder.

The builder (0.18) reads RoPE settings the way transformers 4 configs spelled them:
`config.rope_theta`, a flat `config.rope_parameters` with a `rope_type`, and for Gemma 3
`config.rope_local_base_freq`. transformers 5 loads the same config.json into one nested
`rope_parameters` per attention type and drops those attributes, so the builder stops with
`KeyError: 'rope_type'` or, worse, would fall back to base 10000 silently. This entry point
gives the builder's config object the flat attributes, derived from the nested ones, and
then runs the builder unchanged. Nothing here changes the weights or the graph's design.
"""

from __future__ import annotations

import runpy
from typing import Any

FULL, SLIDING = "full_attention", "sliding_attention"


def flatten_rope(config: Any) -> Any:
    """Add transformers-4 style RoPE attributes to a transformers-5 config, in place."""
    rp = getattr(config, "rope_parameters", None)
    if not isinstance(rp, dict) or not isinstance(rp.get(FULL), dict):
        return config
    full = dict(rp[FULL])
    config.rope_parameters = full
    config.rope_theta = full.get("rope_theta", 10000.0)
    if isinstance(rp.get(SLIDING), dict):
        config.rope_local_base_freq = rp[SLIDING].get("rope_theta", 10000.0)
    return config


def main() -> None:
    from transformers import AutoConfig

    load = AutoConfig.from_pretrained

    def from_pretrained(*args: Any, **kwargs: Any) -> Any:
        return flatten_rope(load(*args, **kwargs))

    AutoConfig.from_pretrained = from_pretrained  # type: ignore[method-assign]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
