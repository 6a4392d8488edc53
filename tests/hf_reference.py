"""Tiny random HF transformers models (PyTorch CPU), the reference for our decoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5)


def tiny_config(family: str, **overrides) -> transformers.PretrainedConfig:
    kwargs = {**TINY, **overrides}
    if family == "llama":
        return transformers.LlamaConfig(**kwargs)
    if family == "mistral":
        kwargs.setdefault("sliding_window", 7)
        return transformers.MistralConfig(**kwargs)
    if family == "qwen2":
        return transformers.Qwen2Config(**kwargs)
    raise ValueError(family)


def save_tiny_model(family: str, folder: Path, *, seed: int = 0, max_shard_size=None,
                    **overrides) -> torch.nn.Module:
    """Random-weight model of `family`, saved as safetensors into `folder`; returns it (eval, f32)."""
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # Random init leaves norms at 1 and biases at 0; perturb them so a wrong
    # mapping of those weights cannot pass unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return model


def hf_logits(model: torch.nn.Module, token_ids: list[int]) -> np.ndarray:
    """Logits `[T, V]` of one sequence, full causal forward, float32."""
    with torch.no_grad():
        out = model(torch.tensor([token_ids]))
    return out.logits[0].float().numpy()
