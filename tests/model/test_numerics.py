"""The numerics module: error-free transformations are exact, compensated
sums survive heavy cancellation in jitted code (and a fast-math build is
caught losing it), and the tree does not depend on padding or batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import numerics
from model.numerics import Precision

ROOT = Path(__file__).resolve().parents[2]


def _exact_sum(values) -> Fraction:
    return sum((Fraction(float(v)) for v in np.asarray(values, np.float64).ravel()), Fraction(0))


def _ulps(result, exact: Fraction) -> float:
    """|result - exact| in units of the last place of float32 at the exact sum."""
    nearest = np.float32(float(exact))
    return float(abs(Fraction(float(result)) - exact) / Fraction(float(np.spacing(abs(nearest)))))


def cancelling_array(n: int = 4096, seed: int = 0) -> np.ndarray:
    """Float32 terms whose sum is small next to their magnitudes (condition number ~1e9):
    large values of many magnitudes and their negations, plus small ones, shuffled."""
    rng = np.random.default_rng(seed)
    big = (rng.standard_normal(n // 4) * 2.0 ** rng.integers(10, 30, n // 4)).astype(np.float32)
    small = rng.standard_normal(n - 2 * len(big)).astype(np.float32)
    # The negations are perturbed in their last bits, so the cancellation is not exact pairs.
    negated = -np.nextafter(big, np.float32(np.inf) * np.sign(big) * rng.choice([-1, 1], len(big)))
    values = np.concatenate([big, negated.astype(np.float32), small])
    return values[rng.permutation(len(values))]


def test_error_free_transformations_inside_fused_jitted_code():
    """XLA:CPU fuses a*b + c into an FMA; the transformations must hold anyway. Only the error
    terms are returned, so each whole computation lands in one fusion."""
    rng = np.random.default_rng(1)
    a = (rng.standard_normal(2000) * 2.0 ** rng.integers(-20, 20, 2000)).astype(np.float32)
    b = (rng.standard_normal(2000) * 2.0 ** rng.integers(-20, 20, 2000)).astype(np.float32)
    s, e = jax.jit(numerics.two_sum)(a, b)
    sum_error = jax.jit(lambda a, b: numerics.two_sum(a, b)[1])(a, b)
    p, f = jax.jit(numerics.two_product)(a, b)
    product_error = jax.jit(lambda a, b: numerics.two_product(a, b)[1])(a, b)
    high_half, low_half = jax.jit(numerics.split)(a)
    fused_low_half = jax.jit(lambda a: numerics.split(a)[1])(a)
    np.testing.assert_array_equal(sum_error, e)
    np.testing.assert_array_equal(product_error, f)
    np.testing.assert_array_equal(fused_low_half, low_half)
    np.testing.assert_array_equal(np.asarray(high_half) + np.asarray(low_half), a)
    # Each half has at most 12 significant bits: the low 12 bits of its 23-bit mantissa are zero.
    for half in (high_half, low_half):
        assert not np.any(np.asarray(half, np.float32).view(np.uint32) & 0xFFF)
    for i in range(len(a)):
        x, y = Fraction(float(a[i])), Fraction(float(b[i]))
        assert Fraction(float(s[i])) + Fraction(float(e[i])) == x + y
        product_error_left = Fraction(float(p[i])) + Fraction(float(f[i])) - x * y
        assert abs(product_error_left) <= abs(x * y) * Fraction(1, 2**46)


def test_compensated_sum_survives_heavy_cancellation_in_jitted_code():
    values = cancelling_array()
    exact = _exact_sum(values)
    condition = float(sum(abs(Fraction(float(v))) for v in values) / abs(exact))
    assert condition >= 1e7, condition
    compensated = jax.jit(lambda x: numerics.sum_(x, precision=Precision.HIGH))(values)
    naive = jax.jit(lambda x: numerics.sum_(x, precision=Precision.STANDARD))(values)
    assert _ulps(compensated, exact) <= 2, (float(compensated), float(exact))
    assert _ulps(naive, exact) >= 1000, (float(naive), float(exact))  # the control: plain float32 loses it


_FAST_MATH_PROBE = """
import json, sys
import jax
sys.path.insert(0, {root!r})
from model import numerics
from tests.model.test_numerics import _exact_sum, _ulps, cancelling_array
values = cancelling_array()
compensated = jax.jit(lambda x: numerics.sum_(x, precision=numerics.Precision.HIGH))(values)
print(json.dumps({{"ulps": _ulps(compensated, _exact_sum(values))}}))
"""


@pytest.mark.parametrize("fast_math", [False, True])
def test_fast_math_is_caught_losing_the_compensation(fast_math):
    """Reassociation (XLA:CPU's fast math) folds TwoSum's error term to zero; the test must see it."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if fast_math:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_enable_fast_math=true").strip()
    out = subprocess.run([sys.executable, "-c", _FAST_MATH_PROBE.format(root=str(ROOT))], env=env,
                         capture_output=True, text=True, timeout=300, check=True, cwd=ROOT)
    ulps = json.loads(out.stdout.strip().splitlines()[-1])["ulps"]
    if fast_math:
        assert ulps > 2, ulps
    else:
        assert ulps <= 2, ulps


def test_compensated_dot_keeps_every_product():
    rng = np.random.default_rng(2)
    a = (rng.standard_normal(1000) * 2.0 ** rng.integers(0, 20, 1000)).astype(np.float32)
    b = np.concatenate([a[:500], -a[:500]]).astype(np.float32)
    a = np.concatenate([a[:500], a[:500] * np.float32(1 + 2**-20)]).astype(np.float32)
    exact = sum((Fraction(float(x)) * Fraction(float(y)) for x, y in zip(a, b)), Fraction(0))
    ours = jax.jit(numerics.compensated_dot)(a, b)
    plain = jnp.sum(jnp.asarray(a) * jnp.asarray(b))
    assert _ulps(ours, exact) <= 2
    assert _ulps(plain, exact) >= 1000


@pytest.mark.parametrize("precision", [Precision.HIGH, Precision.ULTRA])
def test_compensated_reductions_do_not_depend_on_padding_or_batch(precision):
    rng = np.random.default_rng(3)
    row = rng.standard_normal(300).astype(np.float32) * 1e3
    alone = jax.jit(lambda x: numerics.sum_(x, precision=precision))(row)
    for width in (300, 301, 512, 1000, 2048):
        batch = rng.standard_normal((5, width)).astype(np.float32)
        batch[3] = 0.0
        batch[3, :300] = row
        sums = jax.jit(lambda x: numerics.sum_(x, axis=-1, precision=precision))(batch)
        assert np.asarray(sums)[3].tobytes() == np.asarray(alone).tobytes(), width
    # Softmax over a padded, masked axis: the visible part's probabilities are bitwise the same.
    probs = jax.jit(lambda x, w: numerics.softmax(x, where=w, precision=precision))
    short = probs(row[None], np.ones((1, 300), bool))
    padded = np.concatenate([row, rng.standard_normal(724).astype(np.float32)])[None]
    mask = np.zeros((1, 1024), bool)
    mask[0, :300] = True
    assert np.asarray(probs(padded, mask))[0, :300].tobytes() == np.asarray(short)[0].tobytes()


def test_reductions_keep_their_axes_and_agree_with_float64():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 7, 33)).astype(np.float32)
    for axis in (0, 1, 2, -1):
        for keepdims in (False, True):
            ours = numerics.sum_(x, axis=axis, keepdims=keepdims, precision=Precision.ULTRA)
            reference = x.astype(np.float64).sum(axis=axis, keepdims=keepdims)
            assert ours.shape == reference.shape
            np.testing.assert_allclose(ours, reference, rtol=1e-7, atol=1e-6)
    np.testing.assert_allclose(numerics.mean_square(x, precision=Precision.ULTRA),
                               (x.astype(np.float64) ** 2).mean(-1, keepdims=True), rtol=2.5e-7)  # two roundings
    reference = x.astype(np.float64) - np.log(np.exp(x.astype(np.float64)).sum(-1, keepdims=True))
    np.testing.assert_allclose(numerics.log_softmax(x, precision=Precision.ULTRA), reference, atol=1e-6)


def test_double_word_exp_and_silu_in_jitted_code():
    """ULTRA's SiLU: double-word exp, 1 + e, the division and the product, each near 2**-44.
    Constants go through an optimisation barrier: XLA rewrites (c + x) - c to x for a
    constant c, which would zero TwoSum's error term (it did, before the barrier)."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(20000) * 10).astype(np.float32)
    x_lo = (x * rng.standard_normal(20000) * 2**-26).astype(np.float32)
    exact = x.astype(np.float64) + x_lo
    hi, lo = jax.jit(numerics.double_word_exp)(x, x_lo)
    assert np.abs((np.asarray(hi, np.float64) + lo) / np.exp(exact) - 1).max() < 1e-13
    hi, lo = jax.jit(numerics.double_word_silu)(x, x_lo)
    reference = exact / (1 + np.exp(-exact))
    assert (np.abs(np.asarray(hi, np.float64) + lo - reference) / np.abs(reference)).max() < 1e-13
    plain = np.asarray(jax.jit(lambda v: numerics.silu(v, precision=Precision.HIGH))(x), np.float64)
    assert (np.abs(plain - x / (1 + np.exp(-x.astype(np.float64)))) / np.abs(reference)).max() > 1e-9
