"""Jitted forward passes of a decoder over the paged KV cache.

Weights are jit *arguments* (split from the NNX module with `nnx.split`),
never constants baked into the compiled program: one compiled program
serves any weights of the same shapes, and XLA does not fold gigabytes of
constants. The KV cache is donated so XLA updates it in place.

Callers pad inputs to bucketed shapes (see `bucket`), so the number of
compiled programs stays small.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from model.kv_cache import KVCache
from model.llama import LlamaForCausalLM


def bucket(n: int, *, minimum: int = 1) -> int:
    """Smallest power of two ≥ max(n, minimum): the padded size XLA compiles for."""
    size = minimum
    while size < n:
        size *= 2
    return size


class ModelRunner:
    """Owns a model's weights as arrays and its compiled forward functions."""

    def __init__(self, model: LlamaForCausalLM):
        self.config = model.config
        self.graphdef, self.state = nnx.split(model)
        self._forward_last = jax.jit(
            functools.partial(_forward, self.graphdef, all_positions=False), donate_argnums=(3,))
        self._forward_all = jax.jit(
            functools.partial(_forward, self.graphdef, all_positions=True), donate_argnums=(3,))

    def forward(self, token_ids_bt, positions_bt, kv: KVCache, block_tables_bp, is_valid_bt,
                *, all_positions: bool = False) -> tuple[jax.Array, KVCache]:
        """Logits `[B, T, V]` (all_positions) or at each row's last valid token `[B, V]`.

        The passed `kv` is donated: use only the returned cache afterwards.
        """
        fn = self._forward_all if all_positions else self._forward_last
        return fn(self.state, token_ids_bt, positions_bt, kv, block_tables_bp, is_valid_bt)


def _forward(graphdef, state, token_ids_bt, positions_bt, kv, block_tables_bp, is_valid_bt,
             *, all_positions: bool):
    model = nnx.merge(graphdef, state)
    hidden_btd, kv = model(token_ids_bt, positions_bt, kv, block_tables_bp, is_valid_bt)
    if all_positions:
        return model.logits(hidden_btd), kv
    # Only the last valid token of each row needs the (vocabulary-sized) LM head.
    last_b = jnp.maximum(jnp.sum(is_valid_bt, axis=1) - 1, 0)
    hidden_bd = jnp.take_along_axis(hidden_btd, last_b[:, None, None], axis=1)[:, 0]
    return model.logits(hidden_bd), kv
