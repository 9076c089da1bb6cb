"""llama: a compact, faithful and fast PyTorch library for the LLaMA family."""
