"""Base models (HF id | folder | GGUF | tiny test model), depth pruning, LoRA adapters."""
