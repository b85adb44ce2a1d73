"""Task accuracy (ARC, HellaSwag, PIQA, WinoGrande, LAMBADA, ...) through lm-eval, with one
model class serving torch, llama.cpp and onnxruntime. See `run_tasks`."""
