"""Per-request sampling parameters and the on-device sampler.

Reproducibility (shared/DESIGN.md, decision 4): the random key of a draw is
derived from the request's seed and the position of the token being
sampled, so a seeded request samples the same text whatever else runs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from model import numerics


@dataclasses.dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy (argmax)."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@jax.jit
def sample(logits_bv: jax.Array, temperature_b: jax.Array, top_p_b: jax.Array,
           seed_b: jax.Array, position_b: jax.Array) -> jax.Array:
    """One token id per row `[B]` from float32 logits `[B, V]`.

    Rows with temperature 0 take the argmax. Others draw from
    softmax(logits / temperature) restricted to the smallest set of tokens
    whose probability reaches top_p (Holtzman et al., 2020, nucleus sampling).
    """
    greedy_b = jnp.argmax(logits_bv, axis=-1)
    safe_temperature_b = jnp.where(temperature_b > 0, temperature_b, 1.0)
    scaled_bv = logits_bv / safe_temperature_b[:, None]

    # Nucleus: keep a token when the probability mass of strictly more likely
    # tokens is below top_p (so the most likely token is always kept).
    sorted_bv = jnp.sort(scaled_bv, axis=-1)[:, ::-1]
    probs_bv = numerics.softmax(sorted_bv, axis=-1)
    mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
    num_kept_b = jnp.sum(mass_before_bv < top_p_b[:, None], axis=-1)
    threshold_b = jnp.take_along_axis(sorted_bv, (num_kept_b - 1)[:, None], axis=-1)
    masked_bv = jnp.where(scaled_bv >= threshold_b, scaled_bv, -jnp.inf)

    def draw(seed, position, row_v):
        key = jax.random.fold_in(jax.random.key(seed), position)
        return jax.random.categorical(key, row_v)

    sampled_b = jax.vmap(draw)(seed_b, position_b, masked_bv)
    return jnp.where(temperature_b > 0, sampled_b, greedy_b).astype(jnp.int32)
