"""Our decoder's logits for tests and benchmarks: whole sequences without a KV cache, or over a paged one."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.attention import AttentionBackend
from model.numerics import Precision


def logits_function(model):
    """`(ids [B, T], valid [B, T] or None, precision) -> logits [B, T, V]` as numpy.

    One compiled program per level and shape. The weights are an argument of
    the jitted function: closed over, XLA would constant-fold them for minutes.
    """
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, static_argnums=(0,))
    def logits(precision, state, ids, valid):
        m = nnx.merge(graphdef, state)
        return m.logits(m.hidden_states(ids, valid, precision=precision), precision=precision)

    def run(ids, valid=None, precision: Precision = Precision.STANDARD) -> np.ndarray:
        ids = np.asarray(ids, np.int32)
        valid = np.ones_like(ids, bool) if valid is None else valid
        return np.asarray(logits(precision, state, ids, valid))

    return run


class PagedForward:
    """A decoder's forward over a paged KV cache, jitted, for tests that drive the cache by hand
    (prefill then decode, page tables in any order). The engine's own runner is
    engine.batch_runner.BatchRunner; this is the same model call without the scheduling.

    Weights are jit arguments (`nnx.split`), and the cache is donated, as in the engine.
    """

    def __init__(self, model, *, attention_backend: AttentionBackend = AttentionBackend.XLA):
        self.config = model.config
        self.graphdef, self.state = nnx.split(model)
        self._forward_last, self._forward_all = (jax.jit(
            functools.partial(_paged_forward, self.graphdef, all_positions=every, attention_backend=attention_backend),
            donate_argnums=(3,)) for every in (False, True))

    def forward(self, token_ids_bt, positions_bt, kv, block_tables_bp, is_valid_bt, *, all_positions: bool = False):
        """Logits `[B, T, V]` (all_positions) or at each row's last valid token `[B, V]`, and the
        updated cache. The passed `kv` is donated: use only the returned cache afterwards."""
        fn = self._forward_all if all_positions else self._forward_last
        return fn(self.state, token_ids_bt, positions_bt, kv, block_tables_bp, is_valid_bt)


def _paged_forward(graphdef, state, token_ids_bt, positions_bt, kv, block_tables_bp, is_valid_bt, *,
                   all_positions: bool, attention_backend: AttentionBackend):
    model = nnx.merge(graphdef, state)
    hidden_btd, kv = model(token_ids_bt, positions_bt, kv, block_tables_bp, is_valid_bt,
                           attention_backend=attention_backend)
    if all_positions:
        return model.logits(hidden_btd), kv
    last_b = jnp.maximum(jnp.sum(is_valid_bt, axis=1) - 1, 0)
    hidden_bd = jnp.take_along_axis(hidden_btd, last_b[:, None, None], axis=1)[:, 0]
    return model.logits(hidden_bd), kv
