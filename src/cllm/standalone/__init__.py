"""Files that run without cllm installed: edge bundles copy them verbatim next to the model.

They import only the standard library, numpy and the runtime they drive (llama-cpp-python or
onnxruntime), so a board with just that runtime can run them.
"""
