"""Rotary position embeddings (Su et al., 2021, "RoFormer"), in the
half-split layout HF transformers uses for Llama: the first and second
halves of each head are the two coordinates of each rotated pair.

Scaling variants: linear position interpolation (Chen et al., 2023) and
Llama 3's wavelength-dependent interpolation (Meta, Llama 3.1 release).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from model.config import RopeScaling, RopeType


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
    """Per-pair angular frequencies, shape [head_dim // 2], float32.

    Computed once on the host in float64 then rounded, so every compiled
    program sees the same constants.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    if scaling.rope_type is RopeType.LINEAR:
        inv_freq = inv_freq / scaling.factor
    elif scaling.rope_type is RopeType.LLAMA3:
        inv_freq = _llama3_scale(inv_freq, scaling)
    return inv_freq.astype(np.float32)


def _llama3_scale(inv_freq: np.ndarray, s: RopeScaling) -> np.ndarray:
    # Long wavelengths (low frequencies) are divided by `factor`, short ones
    # kept, and the band between is interpolated smoothly.
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled)


def apply_rope(x_btnh: jax.Array, positions_bt: jax.Array, inv_freq_h: np.ndarray) -> jax.Array:
    """Rotate queries or keys `[B, T, N, H]` by their positions `[B, T]`."""
    angles_bth = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_h)
    cos_bth = jnp.cos(angles_bth)[:, :, None, :]
    sin_bth = jnp.sin(angles_bth)[:, :, None, :]
    x = x_btnh.astype(jnp.float32)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = jnp.concatenate([x1 * cos_bth - x2 * sin_bth, x2 * cos_bth + x1 * sin_bth], axis=-1)
    return rotated.astype(x_btnh.dtype)
