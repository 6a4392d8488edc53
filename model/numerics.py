"""The one place where the model reduces over an axis.

Every reduction in `model/` — norm statistics, softmax denominators,
log-softmax — calls a function here, so that precision policies
(compensated summation, batch-invariant order; see the numerics issue) can
change them in one place. For now each is the plain float32 reduction.

All functions upcast to float32 before reducing and return float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sum_(x: jax.Array, axis: int = -1, keepdims: bool = False) -> jax.Array:
    """Sum over `axis` in float32."""
    return jnp.sum(x.astype(jnp.float32), axis=axis, keepdims=keepdims)


def mean(x: jax.Array, axis: int = -1, keepdims: bool = False) -> jax.Array:
    """Arithmetic mean over `axis` in float32."""
    return sum_(x, axis=axis, keepdims=keepdims) / x.shape[axis]


def mean_square(x: jax.Array, axis: int = -1, keepdims: bool = True) -> jax.Array:
    """mean(x²) over `axis` — the RMSNorm statistic."""
    x = x.astype(jnp.float32)
    return mean(x * x, axis=axis, keepdims=keepdims)


def softmax(x: jax.Array, axis: int = -1, where: jax.Array | None = None) -> jax.Array:
    """Softmax over `axis`; entries where `where` is False get probability 0.

    At least one entry per row must be allowed (a causal row always allows
    its own position), so the denominator is never zero.
    """
    x = x.astype(jnp.float32)
    if where is not None:
        x = jnp.where(where, x, -jnp.inf)
    shifted = x - jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
    unnormalised = jnp.exp(shifted)
    return unnormalised / sum_(unnormalised, axis=axis, keepdims=True)


def logsumexp(x: jax.Array, axis: int = -1, keepdims: bool = False,
              where: jax.Array | None = None) -> jax.Array:
    """log(sum(exp(x))) over `axis`, over the entries where `where` is True (at least one per row)."""
    x = x.astype(jnp.float32)
    if where is not None:
        x = jnp.where(where, x, -jnp.inf)
    peak = jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
    out = peak + jnp.log(sum_(jnp.exp(x - peak), axis=axis, keepdims=True))
    return out if keepdims else jnp.squeeze(out, axis=axis)


def log_softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """log(softmax(x)) over `axis`, computed as x - max - log(sum(exp(x - max)))."""
    x = x.astype(jnp.float32)
    shifted = x - jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
    return shifted - jnp.log(sum_(jnp.exp(shifted), axis=axis, keepdims=True))
