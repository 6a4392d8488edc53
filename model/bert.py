"""BERT-family encoder (Devlin et al., 2019) in Flax NNX, for embeddings.

Absolute learned positions, token types, post-norm LayerNorm after attention
and after the feed-forward block, erf GELU. HF transformers'
`modeling_bert.py` (through sentence-transformers) is the numerical
reference in tests. As in the decoder, layer weights are stacked and run by
one `jax.lax.scan`; every reduction goes through `model.numerics`.

A call takes B padded sequences of T tokens and a validity mask; padding
keys get no attention weight, and padded positions' outputs are meaningless
(pooling ignores them).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from model import numerics
from model.config import ConfigError

# Stacked per-layer weights; matrices are [in, out].
ENCODER_LAYER_WEIGHTS = (
    "q_proj", "q_bias",          # [L, D, D], [L, D]
    "k_proj", "k_bias",
    "v_proj", "v_bias",
    "o_proj", "o_bias",
    "attention_norm", "attention_norm_bias",  # [L, D]
    "up_proj", "up_bias",        # [L, D, F], [L, F]
    "down_proj", "down_bias",    # [L, F, D], [L, D]
    "output_norm", "output_norm_bias",
)


@dataclasses.dataclass(frozen=True, slots=True)
class EncoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int = 0

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "max_position_embeddings", "type_vocab_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf_dict(cls, hf: dict) -> "EncoderConfig":
        if hf.get("model_type") != "bert":
            raise ConfigError(f"model_type {hf.get('model_type')!r} is not a BERT encoder")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ConfigError(f"position_embedding_type {hf['position_embedding_type']!r} is not supported")
        if hf.get("hidden_act", "gelu") != "gelu":
            raise ConfigError(f"hidden_act {hf['hidden_act']!r} is not supported (only erf GELU, 'gelu')")
        try:
            return cls(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                       intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
                       num_heads=hf["num_attention_heads"],
                       max_position_embeddings=hf["max_position_embeddings"],
                       type_vocab_size=hf.get("type_vocab_size", 2),
                       layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
                       pad_token_id=hf.get("pad_token_id") or 0)
        except KeyError as e:
            raise ConfigError(f"config.json lacks {e.args[0]!r}") from None


def encoder_weight_shapes(cfg: EncoderConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every stacked layer weight."""
    L, D, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    shapes = {}
    for name in ENCODER_LAYER_WEIGHTS:
        if name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[name] = (L, D, D)
        elif name == "up_proj":
            shapes[name] = (L, D, F)
        elif name == "up_bias":
            shapes[name] = (L, F)
        elif name == "down_proj":
            shapes[name] = (L, F, D)
        else:
            shapes[name] = (L, D)
    return shapes


def layer_norm(x_btd: jax.Array, weight_d: jax.Array, bias_d: jax.Array, eps: float) -> jax.Array:
    """LayerNorm (Ba et al., 2016) with statistics from the numerics module."""
    x = x_btd.astype(jnp.float32)
    mean = numerics.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    variance = numerics.mean(centred * centred, axis=-1, keepdims=True)
    return weight_d * (centred * jax.lax.rsqrt(variance + eps)) + bias_d


class EncoderLayers(nnx.Module):
    """All encoder layers' weights, stacked on a leading layer axis (filled by the loader)."""

    def __init__(self, cfg: EncoderConfig, *, dtype):
        for name, shape in encoder_weight_shapes(cfg).items():
            setattr(self, name, nnx.Param(jnp.ones(shape, dtype) if name.endswith("norm") else
                                          jnp.zeros(shape, dtype)))


class BertEncoder(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, dtype=jnp.float32):
        self.config = cfg
        D = cfg.hidden_size
        self.word_embeddings = nnx.Param(jnp.zeros((cfg.vocab_size, D), dtype))
        self.position_embeddings = nnx.Param(jnp.zeros((cfg.max_position_embeddings, D), dtype))
        self.token_type_embeddings = nnx.Param(jnp.zeros((cfg.type_vocab_size, D), dtype))
        self.embedding_norm = nnx.Param(jnp.ones((D,), dtype))
        self.embedding_norm_bias = nnx.Param(jnp.zeros((D,), dtype))
        self.layers = EncoderLayers(cfg, dtype=dtype)

    def hidden_states(self, token_ids_bt: jax.Array, is_valid_bt: jax.Array,
                      token_type_ids_bt: jax.Array | None = None) -> jax.Array:
        """Hidden states `[B, T, D]` of B sequences padded to T tokens.

        Positions count from 0 in each row (padding is on the right).
        """
        cfg = self.config
        b, t = token_ids_bt.shape
        if token_type_ids_bt is None:
            token_type_ids_bt = jnp.zeros_like(token_ids_bt)
        x_btd = (self.word_embeddings[...][token_ids_bt] + self.position_embeddings[...][jnp.arange(t)][None]
                 + self.token_type_embeddings[...][token_type_ids_bt])
        x_btd = layer_norm(x_btd, self.embedding_norm[...], self.embedding_norm_bias[...], cfg.layer_norm_eps)
        # Keys that are padding get no weight; a row that is all padding
        # attends to itself so the softmax has something to normalise.
        allowed_btt = is_valid_bt[:, None, :] | jnp.eye(t, dtype=bool)[None]
        weights = {name: getattr(self.layers, name)[...] for name in ENCODER_LAYER_WEIGHTS}

        def layer(x_btd, w):
            return _encoder_layer(cfg, x_btd, w, allowed_btt), None

        x_btd, _ = jax.lax.scan(layer, x_btd, weights)
        return x_btd


def _encoder_layer(cfg: EncoderConfig, x_btd: jax.Array, w: dict, allowed_btt: jax.Array) -> jax.Array:
    b, t, d = x_btd.shape
    n, h = cfg.num_heads, cfg.head_dim

    def heads(proj, bias):
        return (x_btd @ w[proj] + w[bias]).reshape(b, t, n, h)

    q_btnh, k_btnh, v_btnh = heads("q_proj", "q_bias"), heads("k_proj", "k_bias"), heads("v_proj", "v_bias")
    scores_bnts = jnp.einsum("BTNH,BSNH->BNTS", q_btnh, k_btnh) / jnp.sqrt(jnp.float32(h))
    probs_bnts = numerics.softmax(scores_bnts, axis=-1, where=allowed_btt[:, None])
    attended_btd = jnp.einsum("BNTS,BSNH->BTNH", probs_bnts, v_btnh).reshape(b, t, d)
    x_btd = layer_norm(x_btd + attended_btd @ w["o_proj"] + w["o_bias"], w["attention_norm"],
                       w["attention_norm_bias"], cfg.layer_norm_eps)
    inner_btf = jax.nn.gelu(x_btd @ w["up_proj"] + w["up_bias"], approximate=False)
    return layer_norm(x_btd + inner_btf @ w["down_proj"] + w["down_bias"], w["output_norm"],
                      w["output_norm_bias"], cfg.layer_norm_eps)
