"""HIGH's and ULTRA's sliced matmuls: the slices are int8, their dots give the same bits as
int8 × int8 → int32 GEMMs and as float32 ones, and weights cut once give the same bits as weights
cut at every call."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import numerics
from model.numerics import Precision


def _activations(rng, shape) -> np.ndarray:
    """Rows of very different magnitudes, a zero row, and tiny and huge entries."""
    x = rng.standard_normal(shape).astype(np.float32) * 2.0 ** rng.integers(-20, 20, shape[:-1] + (1,))
    x[0] = 0.0
    x[1, ::7] *= 2.0 ** -30
    x[2, ::11] *= 2.0 ** 30
    return x.astype(np.float32)


def _weights(rng, k, n, dtype) -> jax.Array:
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    w[::13] *= 2.0 ** -12  # small entries beside large ones in a chunk
    return jnp.asarray(w, dtype)


def _bits(pair) -> tuple[bytes, bytes]:
    return tuple(np.asarray(a).tobytes() for a in pair)


@pytest.mark.parametrize("precision", [Precision.HIGH, Precision.ULTRA])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("k", [64, 576, 1536])
def test_integer_dots_give_the_float32_dots_bits(precision, dtype, k):
    rng = np.random.default_rng(k)
    x = jnp.asarray(_activations(rng, (6, 3, k)))
    w = _weights(rng, k, 40, dtype)
    run = jax.jit(lambda x, s: numerics.exact_matmul(x, s, precision=precision))
    on_the_fly = jax.jit(lambda x, w: numerics.exact_matmul(x, w, precision=precision))(x, w)
    as_float = run(x, numerics.slice_weight(w))
    as_int = run(x, numerics.slice_weight(w, integer_dots=True))
    assert _bits(as_float) == _bits(as_int) == _bits(on_the_fly)
    if precision is Precision.ULTRA:  # a double-word activation: its lo part goes through the same dots
        pair = (x, x * 2.0 ** -30)
        assert _bits(run(pair, numerics.slice_weight(w))) == _bits(run(pair, numerics.slice_weight(w, integer_dots=True)))


def test_slices_are_int8_and_add_up_to_the_weight():
    rng = np.random.default_rng(0)
    w = _weights(rng, 300, 17, jnp.float32)
    sliced = numerics.slice_weight(w)
    assert sliced.ints.dtype == jnp.int8 and sliced.ints.shape == (numerics.EXACT_MAX_SLICES, 2, 256, 17)
    assert int(jnp.max(jnp.abs(sliced.ints.astype(jnp.int32)))) <= 127
    units = 2.0 ** (np.asarray(sliced.exponent, np.float64)[None] - 7 * np.arange(1, 6)[:, None, None, None])
    rebuilt = (np.asarray(sliced.ints, np.float64) * units).sum(0).reshape(512, 17)[:300]
    # 35 bits below each chunk column's largest power of two: float32's 24 bits and more.
    scale = 2.0 ** np.asarray(sliced.exponent, np.float64).repeat(256, axis=1).reshape(512, 17)[:300]
    assert np.all(np.abs(rebuilt - np.asarray(w, np.float64)) <= scale * 2.0 ** -35)


def test_stacked_weights_slice_layer_by_layer():
    rng = np.random.default_rng(1)
    stacked = jnp.asarray(rng.standard_normal((3, 300, 8)).astype(np.float32))
    together = numerics.slice_weight(stacked)
    assert together.ints.shape == (3, numerics.EXACT_MAX_SLICES, 2, 256, 8)
    for layer in range(3):
        alone = numerics.slice_weight(stacked[layer])
        assert np.array_equal(together.ints[layer], alone.ints)
        assert np.array_equal(together.exponent[layer], alone.exponent)


def test_integer_dots_lower_to_an_int8_dot_with_int32_accumulation():
    x = jnp.ones((4, 256), jnp.float32)
    sliced = numerics.slice_weight(jnp.ones((256, 8), jnp.float32), integer_dots=True)
    text = jax.jit(lambda x, s: numerics.exact_matmul(x, s, precision=Precision.HIGH)).lower(x, sliced).as_text()
    assert "i8" in text and "dot_general" in text and "-> tensor<" in text
    assert any("dot_general" in line and "xi8>" in line and "xi32>" in line for line in text.splitlines())
