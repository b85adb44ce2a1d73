"""The built-in pruning methods, listed explicitly: importing this registers them in
`PRUNERS` (third-party methods register from a `cllm.plugins` entry point)."""

from cllm.core.prune import depth, magnitude, sparsegpt, structured, wanda

__all__ = ["depth", "magnitude", "sparsegpt", "structured", "wanda"]
