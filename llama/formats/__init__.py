"""Checkpoint formats: Meta's consolidated shards (`meta`), transformers' safetensors (`hf`),
llama.cpp's GGUF files (`gguf`), PEFT's LoRA adapters (`peft`), and what a path holds (`locate`)."""
