"""`cllm distill`: train a pruned or shrunk student to match its teacher.

losses (divergences at a temperature, hidden-state and attention matching), teacher
(on-the-fly passes or a top-k cache on disk), student (building, freezing, LoRA, sparsity
masks, saving), data (training windows and held-out chunks), state (resumable
checkpoints), loop (the accelerate training loop) and job (the pipeline entry).
"""
