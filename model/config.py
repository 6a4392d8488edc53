"""Decoder configuration for the Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2).

One frozen dataclass describes every member of the family; the differences
between members are fields (QKV bias, sliding window, RoPE scaling, tied
embeddings), never subclasses. `from_hf_dict` reads an HF `config.json`;
the GGUF loader builds the same dataclass from GGUF metadata.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Mapping


class ConfigError(ValueError):
    """A configuration that this code cannot run, with a one-line reason."""


class RopeType(enum.Enum):
    DEFAULT = "default"
    LINEAR = "linear"
    LLAMA3 = "llama3"


@dataclasses.dataclass(frozen=True, slots=True)
class RopeScaling:
    """RoPE frequency scaling. `factor` applies to LINEAR and LLAMA3; the
    remaining fields are Llama 3's wavelength-dependent interpolation."""

    rope_type: RopeType = RopeType.DEFAULT
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.factor <= 0:
            raise ConfigError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.rope_type is RopeType.LLAMA3 and self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError("llama3 rope scaling needs high_freq_factor > low_freq_factor")


# Architectures this decoder implements, as HF `model_type` names.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True, slots=True)
class DecoderConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    has_qkv_bias: bool = False
    # Mistral-style local attention: a query sees at most this many most
    # recent keys (itself included). None means full causal attention.
    sliding_window: int | None = None

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unknown architecture {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be positive, got {self.sliding_window}")

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def to_hf_dict(self) -> dict[str, Any]:
        """An HF `config.json` that `from_hf_dict` reads back as this config (and transformers
        reads as the same model)."""
        rope: dict[str, Any] = {"rope_type": self.rope_scaling.rope_type.value, "rope_theta": self.rope_theta}
        if self.rope_scaling.rope_type is not RopeType.DEFAULT:
            rope["factor"] = self.rope_scaling.factor
        if self.rope_scaling.rope_type is RopeType.LLAMA3:
            s = self.rope_scaling
            rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                        original_max_position_embeddings=s.original_max_position_embeddings)
        hf: dict[str, Any] = {
            "model_type": self.model_type,
            "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                               "qwen2": "Qwen2ForCausalLM"}[self.model_type]],
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "rope_parameters": rope, "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "hidden_act": "silu",
        }
        if self.model_type == "llama":
            hf["attention_bias"] = self.has_qkv_bias
        if self.model_type == "mistral":
            hf["sliding_window"] = self.sliding_window
        return hf

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any]) -> "DecoderConfig":
        """Build from the contents of an HF `config.json`."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unknown architecture {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if hf.get("mlp_bias", False):
            raise ConfigError("mlp_bias=true is not supported")
        if hf.get("hidden_act", "silu") not in ("silu", "swish"):
            raise ConfigError(f"hidden_act {hf['hidden_act']!r} is not supported; the MLP is SwiGLU (silu)")
        try:
            num_heads = int(hf["num_attention_heads"])
            hidden_size = int(hf["hidden_size"])
            head_dim = hf.get("head_dim") or hidden_size // num_heads
            # Newer transformers nest theta and scaling in `rope_parameters`.
            rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
            rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
            return cls(
                model_type=model_type,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden_size,
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
                head_dim=int(head_dim),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling_from_hf(rope),
                max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                has_qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
                sliding_window=_sliding_window_from_hf(model_type, hf),
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks the field {e.args[0]!r}") from None


def rope_scaling_from_hf(rope: Mapping[str, Any]) -> RopeScaling:
    """Parse HF `rope_scaling` / `rope_parameters` (may be empty)."""
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type == "default":
        return RopeScaling()
    if rope_type == "linear":
        return RopeScaling(RopeType.LINEAR, factor=float(rope["factor"]))
    if rope_type == "llama3":
        return RopeScaling(
            RopeType.LLAMA3,
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        )
    raise ConfigError(f"unsupported rope scaling type {rope_type!r}; supported: default, linear, llama3")


def _sliding_window_from_hf(model_type: str, hf: Mapping[str, Any]) -> int | None:
    window = hf.get("sliding_window")
    if model_type == "qwen2":
        if hf.get("use_sliding_window", False):
            # Qwen2 mixes windowed and full layers (max_window_layers); not built yet.
            raise ConfigError("qwen2 with use_sliding_window=true is not supported")
        return None
    if model_type == "mistral" and window is not None:
        return int(window)
    return None
