"""Files that run without cllm installed: edge bundles copy them verbatim next to the model.

They import only the standard library, numpy and the runtime they drive (llama-cpp-python or
onnxruntime), so a board with just that runtime can run them.
"""

from pathlib import Path


def shipped_files() -> list[Path]:
    """What a board needs beside the model: the runner, then the loader guard and the power
    meters it imports from beside itself."""
    here = Path(__file__).resolve().parent
    return [here / "runner.py", here / "guard.py", here / "energy.py"]
