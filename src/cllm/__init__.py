"""cllm: compress large language models with composable Unix-style commands.

The package root stays import-light (no torch) so that `cllm --help` is fast;
heavy modules are imported by the commands that need them.
"""

__version__ = "0.1.0"
