"""Sentence embeddings from hidden states: pooling over valid tokens, then
optional L2 normalisation, as sentence-transformers' Pooling and Normalize
modules do. Sums go through `model.numerics`."""

from __future__ import annotations

import dataclasses
import enum

import jax
import jax.numpy as jnp

from model import numerics


class PoolingMode(enum.Enum):
    MEAN = "mean"  # average of the valid tokens
    CLS = "cls"  # the first token
    MAX = "max"  # element-wise maximum over the valid tokens
    LAST = "last"  # the last valid token (decoder models)


@dataclasses.dataclass(frozen=True, slots=True)
class PoolingConfig:
    mode: PoolingMode = PoolingMode.MEAN
    normalize: bool = False


def pool(hidden_btd: jax.Array, is_valid_bt: jax.Array, config: PoolingConfig) -> jax.Array:
    """One vector `[B, D]` per row; rows need at least one valid token."""
    hidden_btd = hidden_btd.astype(jnp.float32)
    valid_bt1 = is_valid_bt[..., None]
    if config.mode is PoolingMode.MEAN:
        total_bd = numerics.sum_(jnp.where(valid_bt1, hidden_btd, 0.0), axis=1)
        pooled_bd = total_bd / jnp.maximum(numerics.sum_(is_valid_bt, axis=1), 1.0)[:, None]
    elif config.mode is PoolingMode.CLS:
        pooled_bd = hidden_btd[:, 0]
    elif config.mode is PoolingMode.MAX:
        pooled_bd = jnp.max(jnp.where(valid_bt1, hidden_btd, -jnp.inf), axis=1)
    else:
        last_b = jnp.maximum(numerics.sum_(is_valid_bt, axis=1).astype(jnp.int32) - 1, 0)
        pooled_bd = jnp.take_along_axis(hidden_btd, last_b[:, None, None], axis=1)[:, 0]
    if config.normalize:
        # torch.nn.functional.normalize's rule: divide by max(‖x‖, 1e-12).
        norm_b1 = jnp.sqrt(numerics.sum_(pooled_bd * pooled_bd, axis=-1, keepdims=True))
        pooled_bd = pooled_bd / jnp.maximum(norm_b1, 1e-12)
    return pooled_bd
