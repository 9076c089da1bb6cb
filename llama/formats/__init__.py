"""Checkpoint formats: Meta's consolidated shards (`meta`) and transformers' safetensors (`hf`)."""
