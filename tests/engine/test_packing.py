"""Packing step inputs into one buffer and unpacking them on device is lossless."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from engine.packing import pack, unpack


def test_round_trip_is_bit_exact():
    rng = np.random.default_rng(0)
    tree = {"ids": rng.integers(-5, 5, (3, 4)).astype(np.int32),
            "temps": np.array([0.0, -0.0, np.inf, 1e-38, np.nan], np.float32),
            "seeds": np.array([0, 2**32 - 1, 12345], np.uint32),
            "mask": rng.random((2, 3)) > 0.5,
            "nested": (np.zeros((0,), np.float32), np.ones((1, 1), np.int32))}
    buffer, layout = pack(tree)
    assert buffer.dtype == np.int32 and buffer.ndim == 1
    out = jax.jit(unpack, static_argnums=1)(buffer, layout)
    for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(tree)):
        got = np.asarray(got)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


def test_layout_is_hashable_and_shape_dependent():
    _, a = pack((np.zeros((2, 3), np.int32),))
    _, b = pack((np.zeros((2, 3), np.int32),))
    _, c = pack((np.zeros((3, 2), np.int32),))
    assert hash(a) == hash(b) and a == b and a != c


def test_unsupported_dtype():
    with pytest.raises(TypeError):
        pack((np.zeros(3, np.float64),))
