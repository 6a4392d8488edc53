"""Our decoder's logits for whole sequences (no KV cache), for comparisons in tests and benchmarks."""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

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
