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


def float64_reference(model: torch.nn.Module) -> torch.nn.Module:
    """`model` (converted in place) computing every step in float64.

    `.double()` alone is not enough: HF's RMSNorm casts its input to float32
    for the statistics, its rotary embedding keeps the inverse frequencies and
    the angles in float32, and eager attention's softmax runs in float32. Those
    three are replaced here; attention goes through SDPA, which computes in the
    input's dtype. Only the default (unscaled) RoPE is rebuilt.
    """
    model = model.double()
    model.config._attn_implementation = "sdpa"
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm"):
            module.forward = _float64_rms_norm(module)
        elif name.endswith("RotaryEmbedding"):
            if module.rope_type != "default":
                raise ValueError(f"float64 reference: RoPE type {module.rope_type!r} is not rebuilt")
            module.forward = _float64_rotary(module, model.config)
    return model


def _float64_rms_norm(norm):
    def forward(x):
        x = x.double()
        return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))
    return forward


def _float64_rotary(rotary, config):
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    theta = config.rope_parameters["rope_theta"]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)

    def forward(x, position_ids):
        angles = position_ids[..., None].double() * inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos() * rotary.attention_scaling, angles.sin() * rotary.attention_scaling
    return forward
