"""Files → weights, tokenizers and chat templates (HF safetensors, GGUF)."""
