"""The one place where the model reduces over an axis, at a chosen precision level.

Every reduction in `model/` — norm statistics, softmax denominators,
log-softmax, pooling — calls a function here with a `Precision`:

- STANDARD: the plain float32 reduction (XLA's order, which may depend on
  shapes).
- HIGH and ULTRA: a compensated sum — a pairwise tree of double-word
  additions (hi, lo pairs built from error-free transformations) over the
  axis padded with zeros to a power of two. Its result is close to the
  exact sum rounded once, even under heavy cancellation, and the tree's
  shape depends only on the axis, never on the batch: padding with zeros
  leaves every partial sum unchanged, so a row reduces bitwise the same in
  any batch and at any padded length.

Error-free transformations (Knuth's TwoSum, Dekker's FastTwoSum, a
TwoProduct from Veltkamp splitting) return a result and its rounding error.
They rely on IEEE rounding of each operation: compilers must not
reassociate (XLA:CPU's fast math would; it is off by default, and
tests/model/test_numerics.py checks both). XLA:CPU does contract a*b + c
into a fused multiply-add, though, whenever the two meet in one fusion,
and there is no FMA primitive to ask for one. So a product whose rounding
matters is never written next to an addition here: the split computes
4097·a as a·4096 + a (the product is exact, so fused or not the result is
the same), and TwoProduct adds up the four exact half-products instead of
subtracting them from the rounded product.

Double-word addition is Joldes, Muller & Popescu's "AccurateDWPlusDW"
(2017), relative error below 3u² per addition.

All functions upcast to float32 before reducing and return float32.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from model import quantization
from model.quantization import Int8Weight


class Precision(enum.Enum):
    STANDARD = "standard"
    HIGH = "high"
    ULTRA = "ultra"

    @property
    def is_compensated(self) -> bool:
        return self is not Precision.STANDARD


STANDARD = Precision.STANDARD

# -- error-free transformations -------------------------------------------------------------


def two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """s = fl(a + b) and e with a + b = s + e exactly (any a, b)."""
    s = a + b
    b_virtual = s - a
    e = (a - (s - b_virtual)) + (b - b_virtual)
    return s, e


def fast_two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """s = fl(a + b) and e with a + b = s + e exactly, when |a| >= |b| (or a is 0)."""
    s = a + b
    return s, b - (s - a)


_SPLITTER = 4097.0  # 2**12 + 1: splits float32's 24-bit significand into two 12-bit halves


def split(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """hi + lo = a exactly, each with at most 12 significant bits (Veltkamp)."""
    c = a * (_SPLITTER - 1.0) + a  # fl(4097·a), fused into an FMA or not
    hi = c - (c - a)
    return hi, a - hi


def two_product(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """p ≈ a·b and e with p + e = a·b to within a relative 2⁻⁴⁶ (barring underflow and overflow).

    The four half-products are exact in float32; three TwoSums add them.
    """
    a_hi, a_lo = split(a)
    b_hi, b_lo = split(b)
    p, e1 = two_sum(a_hi * b_hi, a_hi * b_lo)
    p, e2 = two_sum(p, a_lo * b_hi)
    p, e3 = two_sum(p, a_lo * b_lo)
    return fast_two_sum(p, e1 + e2 + e3)


def double_word_add(x_hi, x_lo, y_hi, y_lo):
    """(x_hi + x_lo) + (y_hi + y_lo) as a normalised double-word (AccurateDWPlusDW)."""
    s_hi, s_lo = two_sum(x_hi, y_hi)
    t_hi, t_lo = two_sum(x_lo, y_lo)
    v_hi, v_lo = fast_two_sum(s_hi, s_lo + t_hi)
    return fast_two_sum(v_hi, t_lo + v_lo)


def double_word_sum(hi: jax.Array, lo: jax.Array | None = None, axis: int = -1,
                    keepdims: bool = False) -> tuple[jax.Array, jax.Array]:
    """The sum over `axis` of float32 terms (hi + lo, lo optional) as a double-word (hi, lo).

    A pairwise tree of double-word additions over the axis padded with zeros
    to a power of two: neighbours first, so a term's partners never depend on
    how much padding follows. The axis goes first, so that each level adds
    whole contiguous blocks (with it last, neighbours are strided and the
    tree ran 2 to 6 times slower).
    """
    hi = jnp.moveaxis(hi.astype(jnp.float32), axis, 0)
    lo = None if lo is None else jnp.moveaxis(lo.astype(jnp.float32), axis, 0)
    n = hi.shape[0]
    width = 1 << max(n - 1, 0).bit_length()  # the next power of two
    if width != n:
        padding = [(0, width - n)] + [(0, 0)] * (hi.ndim - 1)
        hi = jnp.pad(hi, padding)
        lo = None if lo is None else jnp.pad(lo, padding)
    while hi.shape[0] > 1:
        pairs = (hi.shape[0] // 2, 2) + hi.shape[1:]
        hi = hi.reshape(pairs)
        if lo is None:  # the first level of plain terms: one TwoSum each
            hi, lo = two_sum(hi[:, 0], hi[:, 1])
        else:
            lo = lo.reshape(pairs)
            hi, lo = double_word_add(hi[:, 0], lo[:, 0], hi[:, 1], lo[:, 1])
    lo = jnp.zeros_like(hi) if lo is None else lo
    if keepdims:
        return jnp.moveaxis(hi, 0, axis), jnp.moveaxis(lo, 0, axis)
    return hi[0], lo[0]


def compensated_sum(x: jax.Array, axis: int = -1, keepdims: bool = False) -> jax.Array:
    """The sum over `axis`, close to the exact sum rounded once to float32."""
    hi, _ = double_word_sum(x, axis=axis, keepdims=keepdims)
    return hi  # normalised: hi is already fl(hi + lo)


def compensated_dot(a: jax.Array, b: jax.Array, axis: int = -1, keepdims: bool = False) -> jax.Array:
    """Σ a·b over `axis` with every product kept exactly (Dot2 of Ogita, Rump & Oishi, as a tree)."""
    p, e = two_product(a.astype(jnp.float32), b.astype(jnp.float32))
    hi, _ = double_word_sum(p, e, axis=axis, keepdims=keepdims)
    return hi


def double_word_rms_scale(x_hi: jax.Array, x_lo: jax.Array, eps: float, axis: int = -1
                          ) -> tuple[jax.Array, jax.Array]:
    """1/√(mean(x²) + eps) over `axis` (kept) for x = x_hi + x_lo, as a double-word.

    The mean square is a double-word (exact squares, a compensated sum, an
    exact remainder for the division by n); one Newton step on the float32
    reciprocal square root recovers the bits below it.
    """
    square, square_error = two_product(x_hi, x_hi)
    s_hi, s_lo = double_word_sum(square, square_error + 2.0 * x_hi * x_lo, axis=axis, keepdims=True)
    n = float(x_hi.shape[axis])
    q_hi = s_hi / n
    back, back_error = two_product(q_hi, jnp.full_like(q_hi, n))  # q_hi·n exactly
    q_lo = ((s_hi - back) - back_error + s_lo) / n
    v_hi, v_lo = double_word_add(q_hi, q_lo, _opaque(jnp.full_like(q_hi, eps)), jnp.zeros_like(q_hi))
    r = 1.0 / jnp.sqrt(v_hi)
    r2_hi, r2_lo = two_product(r, r)
    t_hi, t_error = two_product(v_hi, r2_hi)
    residual = (1.0 - t_hi) - (t_error + v_hi * r2_lo + v_lo * r2_hi)  # 1 − v·r², t_hi ≈ 1
    return r, r * 0.5 * residual


def _opaque(x: jax.Array) -> jax.Array:
    """`x`, hidden from XLA's simplifier: it rewrites (c + y) − c to y when c is a constant,
    which zeroes TwoSum's error term (measured), so constants enter these functions through this."""
    return jax.lax.optimization_barrier(x)


def double_word_mul(x_hi, x_lo, y_hi, y_lo):
    """(x_hi + x_lo)·(y_hi + y_lo) as a normalised double-word (Joldes et al.'s DWTimesDW1)."""
    c_hi, c_lo = two_product(x_hi, y_hi)
    return fast_two_sum(c_hi, c_lo + (x_hi * y_lo + x_lo * y_hi))


def double_word_div(x_hi, x_lo, y_hi, y_lo):
    """(x_hi + x_lo)/(y_hi + y_lo) as a normalised double-word (DWDivDW1)."""
    t_hi = x_hi / y_hi
    r_hi, r_lo = double_word_mul(y_hi, y_lo, t_hi, jnp.zeros_like(t_hi))
    pi_hi, pi_lo = two_sum(x_hi, -r_hi)
    delta = pi_hi + (pi_lo + (x_lo - r_lo))
    return fast_two_sum(t_hi, delta / y_hi)


# ln 2 in three parts for the double-word exp: 0.693145751953125 (k times it is exact),
# then the float32 nearest the rest, then what is left (ln 2 to about 2**-70).
_LN2_REST = 0.6931471805599453 - 0.693145751953125
_LN2_LO_HI = float(np.float32(_LN2_REST))
_LN2_LO_LO = _LN2_REST - _LN2_LO_HI


def double_word_exp(x_hi: jax.Array, x_lo: jax.Array) -> tuple[jax.Array, jax.Array]:
    """e**(x_hi + x_lo) as a double-word, to about 2**-44 relative, for |x| < 80."""
    k = jnp.floor(x_hi * 1.4426950408889634 + 0.5)
    # r = x − k·ln 2, with k·ln 2 in three parts: the first product is exact, the second kept exactly.
    r_hi, r_lo = double_word_add(x_hi, x_lo, -k * 0.693145751953125, jnp.zeros_like(k))
    product, product_error = two_product(-k, jnp.full_like(k, _LN2_LO_HI))
    r_hi, r_lo = double_word_add(r_hi, r_lo, product, product_error - k * _LN2_LO_LO)
    # Taylor to r**13 (|r| <= ln2 / 2: the rest is below 2**-52), Horner in double-words.
    p_hi, p_lo = jnp.full_like(k, 1.0 / math.factorial(13)), jnp.zeros_like(k)
    for n in range(12, -1, -1):
        c = 1.0 / math.factorial(n)
        c_hi = float(np.float32(c))
        p_hi, p_lo = double_word_mul(p_hi, p_lo, r_hi, r_lo)
        p_hi, p_lo = double_word_add(p_hi, p_lo, _opaque(jnp.full_like(k, c_hi)), jnp.full_like(k, c - c_hi))
    k = k.astype(jnp.int32)
    k_half = k >> 1
    scale_a, scale_b = _power_of_two(k_half), _power_of_two(k - k_half)
    return (p_hi * scale_a) * scale_b, (p_lo * scale_a) * scale_b  # powers of two: exact


def double_word_silu(x_hi: jax.Array, x_lo: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x·sigmoid(x) of a double-word, as one (ULTRA's SiLU)."""
    clipped_hi = jnp.clip(x_hi, -80.0, 80.0)
    clipped_lo = jnp.where(clipped_hi == x_hi, x_lo, 0.0)
    e_hi, e_lo = double_word_exp(-clipped_hi, -clipped_lo)
    one = _opaque(jnp.ones_like(e_hi))
    d_hi, d_lo = double_word_add(one, jnp.zeros_like(e_hi), e_hi, e_lo)
    sig_hi, sig_lo = double_word_div(one, jnp.zeros_like(d_hi), d_hi, d_lo)
    out_hi, out_lo = double_word_mul(x_hi, x_lo, sig_hi, sig_lo)
    # Beyond ±80 sigmoid is 0 or 1 to far below a float32's last bit.
    out_hi = jnp.where(x_hi > 80.0, x_hi, jnp.where(x_hi < -80.0, 0.0, out_hi))
    out_lo = jnp.where(x_hi > 80.0, x_lo, jnp.where(x_hi < -80.0, 0.0, out_lo))
    return out_hi, out_lo


# -- elementwise functions that give the same bits in any array ------------------------------
#
# XLA:CPU evaluates exp, log, logistic and rsqrt by one method in its
# vectorised loop and another in the loop's scalar remainder, so an element's
# value can change with the array's size (measured: exp(x - max) over a
# softmax row changed in the last bit when the batch grew). HIGH and ULTRA
# use these instead: range reduction and polynomials in +, ×, floor and
# exponent bits, each correctly rounded wherever it runs.

_LN2_HI = 0.693145751953125  # ln 2 with its low bits cleared: k·_LN2_HI is exact for |k| < 2**9
_LN2_LO = 1.428606765330187e-06  # ln 2 − _LN2_HI


def exp(x: jax.Array, *, precision: Precision = STANDARD) -> jax.Array:
    """e**x in float32 (within 2 ulps under HIGH and ULTRA; 0 below e**-87, inf above e**88.7)."""
    if not precision.is_compensated:
        return jnp.exp(x)
    x = x.astype(jnp.float32)
    clipped = jnp.clip(x, -87.0, 88.72)
    k = jnp.floor(clipped * 1.4426950408889634 + 0.5)  # up to 128
    r = (clipped - k * _LN2_HI) - k * _LN2_LO  # |r| <= ln2 / 2, a little more at the ends
    poly = 1.0 / 5040
    for c in (1.0 / 720, 1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0):  # Taylor to r**7: below float32's ulp
        poly = poly * r + c
    # 2**k as two powers of two, each a normal float32 for any k in [-126, 128].
    k = k.astype(jnp.int32)
    k_half = k >> 1
    out = (poly * _power_of_two(k_half)) * _power_of_two(k - k_half)
    return jnp.where(x < -87.0, 0.0, jnp.where(x > 88.72, jnp.inf, out))


def _power_of_two(k: jax.Array) -> jax.Array:
    """2**k for int32 k in [-126, 127], from its exponent bits."""
    return jax.lax.bitcast_convert_type((k + 127) << 23, jnp.float32)


def log(x: jax.Array, *, precision: Precision = STANDARD) -> jax.Array:
    """Natural log in float32, of positive normal x under HIGH and ULTRA (within 2 ulps)."""
    if not precision.is_compensated:
        return jnp.log(x)
    x = x.astype(jnp.float32)
    mantissa, exponent = jnp.frexp(x)  # x = m·2**e, m in [0.5, 1)
    is_low = mantissa < 0.7071067811865476
    mantissa = jnp.where(is_low, mantissa * 2.0, mantissa)  # now in [√½, √2)
    e = (exponent - is_low.astype(exponent.dtype)).astype(jnp.float32)
    s = (mantissa - 1.0) / (mantissa + 1.0)  # log m = 2·atanh(s), |s| < 0.172
    s2 = s * s
    series = 1.0 / 13
    for c in (1.0 / 11, 1.0 / 9, 1.0 / 7, 1.0 / 5, 1.0 / 3, 1.0):
        series = series * s2 + c
    return (e * _LN2_HI + 2.0 * s * series) + e * _LN2_LO


def rsqrt(x: jax.Array, *, precision: Precision = STANDARD) -> jax.Array:
    """1/√x; under HIGH and ULTRA from the correctly rounded square root and division."""
    return 1.0 / jnp.sqrt(x) if precision.is_compensated else jax.lax.rsqrt(x)


def silu(x: jax.Array, *, precision: Precision = STANDARD) -> jax.Array:
    """x·sigmoid(x) (SiLU); under HIGH and ULTRA through `exp`."""
    if not precision.is_compensated:
        return jax.nn.silu(x)
    return x / (1.0 + exp(-x, precision=precision))


# -- matmuls --------------------------------------------------------------------------------

# HIGH's and ULTRA's matmuls (the Ozaki scheme): K is cut into chunks of
# EXACT_CHUNK terms; within a chunk each row of x and each column of w is cut
# into slices at a common power-of-two scale, each slice a signed integer of
# at most EXACT_SLICE_BITS bits (|m| ≤ 127: an int8) times its unit. A dot of
# two slices is then a sum of at most EXACT_CHUNK integers below 2**14, under
# 2**22: exact in int32, and exact in float32 in any order (in TF32 and
# bfloat16 too: a 7-bit integer fits their significands) — so the dot may run
# as int8 × int8 → int32 (what tensor cores and VNNI run fastest) or in
# float32, with the same bits. Each dot's integer sum is scaled by its two
# units (powers of two: exact), and the chunk and slice results are added by a
# compensated sum. What the last slice leaves out is dropped — the same bits
# whatever the batch, so the result never depends on it.
EXACT_CHUNK = 256
EXACT_SLICE_BITS = 7
EXACT_MAX_SLICES = 5
# Slices of (activations, weights): HIGH keeps 28 bits of activations and of
# float32 weights (beyond float32's own 24), 21 of bfloat16 weights (exact for
# one within 13 binades of its column's largest); ULTRA 35 of each.
EXACT_SLICES = {Precision.HIGH: (4, 4), Precision.ULTRA: (5, 5)}
_HIGH_BF16_WEIGHT_SLICES = 3
# The dots of slices state their algorithm: plain float32 products and sums,
# never TF32 or another default a backend might pick.
_F32_DOT = jax.lax.DotAlgorithmPreset.F32_F32_F32


@functools.partial(jax.tree_util.register_dataclass, data_fields=["ints", "exponent"],
                   meta_fields=["high_slices", "integer_dots"])
@dataclasses.dataclass(frozen=True)
class SlicedWeight:
    """A weight matrix `[..., K, N]` cut once into HIGH's and ULTRA's slices (see EXACT_CHUNK),
    so that a step need not cut it again: `matmul` takes it wherever it takes the matrix,
    with the same bits. Leading dimensions (stacked layers) stay in front."""

    ints: jax.Array  # [..., EXACT_MAX_SLICES, K / chunk, chunk, N] int8
    exponent: jax.Array  # [..., K / chunk, 1, N] int32: slice i's unit is 2**(exponent - 7·(i + 1))
    high_slices: int  # how many HIGH uses (fewer for a bfloat16 matrix)
    integer_dots: bool  # run the slices' dots as int8 × int8 → int32 (else in float32; the same bits)


def slice_weight(w: jax.Array, *, integer_dots: bool = False) -> SlicedWeight:
    """`w` `[..., K, N]` in EXACT_MAX_SLICES int8 slices per chunk and column; an int8 matrix
    (quantisation's integers) in one, which holds it exactly: |q| < 2**e with e ≤ 7, so
    q · 2**(7 − e) is an integer below 2**7."""
    count = 1 if w.dtype == jnp.int8 else EXACT_MAX_SLICES
    ints, exponent = _slice_ints(_k_chunks(w.astype(jnp.float32), -2), axis=-2, count=count)
    high = _HIGH_BF16_WEIGHT_SLICES if w.dtype == jnp.bfloat16 else EXACT_SLICES[Precision.HIGH][1]
    return SlicedWeight(jnp.moveaxis(ints, 0, -4).astype(jnp.int8), exponent, min(high, count), integer_dots)


def matmul(x: jax.Array | tuple[jax.Array, jax.Array], w: jax.Array | SlicedWeight, *,
           precision: Precision = STANDARD) -> jax.Array:
    """x `[..., K]` @ w `[K, N]` (x a double-word only under ULTRA; w an array, or under HIGH and
    ULTRA its SlicedWeight).

    STANDARD: XLA's matmul in the operands' dtype. HIGH and ULTRA: sliced,
    error-free products (see EXACT_CHUNK), whose result does not depend on
    the matmul's order of accumulation, so it is the same whatever the batch.
    A SlicedWeight says whether the slices' dots run in int8 or float32 (the same bits).
    An Int8Weight (model.quantization) multiplies as its integers times its scales.
    """
    if precision is Precision.STANDARD:
        return quantization.matmul(x, w) if isinstance(w, Int8Weight) else x @ w
    return exact_matmul(x, w, precision=precision)[0]


def exact_matmul(x: jax.Array | tuple[jax.Array, jax.Array], w: jax.Array | SlicedWeight, *,
                 precision: Precision = Precision.ULTRA) -> tuple[jax.Array, jax.Array]:
    """x @ w as a double-word (hi, lo), from HIGH's or ULTRA's slices.

    `x` may be a double-word itself: its lo part goes through the same
    error-free matmul (a plain one would round in an order that depends on
    the batch) and is added on.
    """
    if isinstance(w, Int8Weight):
        # The integers' exact product, then each column times its scale: elementwise, so the
        # result is as batch-invariant as the product (the scale has no low part).
        hi, lo = exact_matmul(x, w.ints, precision=precision)
        return double_word_mul(hi, lo, w.scale, jnp.zeros_like(w.scale))
    x_hi, x_lo = x if isinstance(x, tuple) else (x, None)
    sliced = w if isinstance(w, SlicedWeight) else slice_weight(w)
    x_count, w_count = EXACT_SLICES[precision]
    if precision is Precision.HIGH:
        w_count = sliced.high_slices
    w_count = min(w_count, sliced.ints.shape[-4])  # one slice holds an int8 matrix
    x_ints, x_exponent = _slice_ints(_k_chunks(x_hi.astype(jnp.float32), -1), axis=-1, count=x_count)
    # One dot per weight slice, each over a contiguous [G, C, N] block with the chunk axis G as
    # the batch: as one einsum over all slices, XLA:CPU transposed the whole slice stack each call.
    if sliced.integer_dots:
        x_ints = x_ints.astype(jnp.int8)
        partial = jnp.stack([jnp.einsum("i...gc,gcn->gi...n", x_ints, sliced.ints[j],
                                        preferred_element_type=jnp.int32) for j in range(w_count)], axis=2)
        partial = partial.astype(jnp.float32)
    else:
        partial = jnp.stack([jnp.einsum("i...gc,gcn->gi...n", x_ints, sliced.ints[j].astype(jnp.float32),
                                        precision=_F32_DOT) for j in range(w_count)], axis=2)
    # partial[g, i, j, ..., n] is in units of 2**(x_exponent[..., g] - 7(i+1)) · 2**(w_exponent[g, n] - 7(j+1)).
    x_units = _units(jnp.moveaxis(x_exponent[..., 0], -1, 0), x_count)  # [G, Sx, ...]
    w_units = _units(sliced.exponent[:, 0, :], w_count)  # [G, Sw, N]
    extra = partial.ndim - 4  # the activations' leading dims
    x_units = x_units.reshape(x_units.shape[:2] + (1,) + x_units.shape[2:] + (1,))
    w_units = w_units.reshape(w_units.shape[:1] + (1, w_count) + (1,) * extra + w_units.shape[2:])
    scaled = (partial * x_units) * w_units  # two powers of two: exact
    hi, lo = double_word_sum(scaled.reshape((-1,) + scaled.shape[3:]), axis=0)
    if x_lo is None:
        return hi, lo
    return double_word_add(hi, lo, *exact_matmul(x_lo, sliced, precision=precision))


def batched_matmul(a: jax.Array, b: jax.Array, *, precision: Precision = STANDARD) -> jax.Array:
    """a `[..., M, K]` @ b `[..., K, N]` over the same leading dimensions, in float32;
    HIGH's and ULTRA's are error-free as `matmul`'s (activation slices on both sides)."""
    if precision is Precision.STANDARD:
        return jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))
    return exact_batched_matmul(a, b, precision=precision)[0]


def exact_batched_matmul(a: jax.Array, b: jax.Array, *,
                         precision: Precision = Precision.ULTRA) -> tuple[jax.Array, jax.Array]:
    """a @ b over leading dimensions, as a double-word (hi, lo)."""
    count = EXACT_SLICES[precision][0]
    a_smgc = _slice_pieces(_k_chunks(a.astype(jnp.float32), -1), axis=-1, count=count)  # [S, ..., M, G, C]
    b_sgcn = _slice_pieces(_k_chunks(b.astype(jnp.float32), -2), axis=-2, count=count)  # [S, ..., G, C, N]
    partial = jnp.einsum("i...mgc,j...gcn->gij...mn", a_smgc, b_sgcn, precision=_F32_DOT)
    return double_word_sum(partial.reshape((-1,) + partial.shape[3:]), axis=0)


# Attention's probabilities × values: a column of values would be scaled by
# its largest entry over the keys in the call, which differ between a
# prefill (all the chunk's keys) and a decode (keys up to its position). So
# values are cut on a fixed grid instead, from VALUE_GRID_TOP down, in 8-bit
# steps, and a slice never depends on other entries; a query's probabilities
# keep their own row's scale, which only its visible keys decide. A product of
# slices is below 2**7 · 2**8, a chunk's sum below 2**23: exact. Values of
# magnitude 2**VALUE_GRID_TOP or more would no longer sum exactly (still
# accurately); LLM attention values stay far below.
VALUE_GRID_TOP = 16
_VALUE_GRID_BITS = 8
_VALUE_SLICES = {Precision.HIGH: 5, Precision.ULTRA: 7}  # down to 2**-24 and 2**-40


def exact_attention_values(probs: jax.Array, values: jax.Array, *, precision: Precision
                           ) -> tuple[jax.Array, jax.Array]:
    """probs `[..., Q, S]` @ values `[..., S, H]` as a double-word, the same bits for a query
    whatever other keys or queries share the call."""
    count = EXACT_SLICES[precision][0]
    p_smgc = _slice_pieces(_k_chunks(probs.astype(jnp.float32), -1), axis=-1, count=count)
    v_sgcn = _fixed_slices(_k_chunks(values.astype(jnp.float32), -2), top=VALUE_GRID_TOP,
                           count=_VALUE_SLICES[precision])
    partial = jnp.einsum("i...mgc,j...gcn->gij...mn", p_smgc, v_sgcn, precision=_F32_DOT)
    return double_word_sum(partial.reshape((-1,) + partial.shape[3:]), axis=0)


def _fixed_slices(x: jax.Array, *, top: int, count: int) -> jax.Array:
    """`[count, *x.shape]`: x cut at 2**(top - 8), 2**(top - 16), … whatever its neighbours."""
    rest, slices = x, []
    for i in range(count):
        unit = 2.0 ** (top - _VALUE_GRID_BITS * (i + 1))
        piece = jnp.round(rest / unit) * unit
        slices.append(piece)
        rest = rest - piece
    return jnp.stack(slices)


def _k_chunks(x: jax.Array, axis: int) -> jax.Array:
    """`axis` (K) padded with zeros to whole chunks and split in place into [K / chunk, chunk]."""
    axis = axis % x.ndim
    k = x.shape[axis]
    chunks = -(-k // EXACT_CHUNK)
    if chunks * EXACT_CHUNK != k:  # zero terms change no partial sum
        padding = [(0, 0)] * x.ndim
        padding[axis] = (0, chunks * EXACT_CHUNK - k)
        x = jnp.pad(x, padding)
    return x.reshape(x.shape[:axis] + (chunks, EXACT_CHUNK) + x.shape[axis + 1:])


def _slice_ints(x: jax.Array, axis: int, count: int) -> tuple[jax.Array, jax.Array]:
    """x cut along `axis` into `count` integers `[count, *x.shape]` (float32, |m| ≤ 127) and the
    exponent (`axis` kept, int32): x ≈ Σ_i m_i · 2**(exponent − 7·(i+1)), what the last leaves dropped.

    Each slice is the rest truncated toward zero at its unit, so it stays
    below 2**7 in magnitude: every step scales by a power of two or drops
    low bits, all exact. The exponent's floor keeps every unit a normal float
    and does not depend on `count`, so fewer slices are a prefix of more.
    """
    _, exponent = jnp.frexp(jnp.max(jnp.abs(x), axis=axis, keepdims=True))  # |x| < 2**exponent
    exponent = jnp.maximum(exponent, EXACT_SLICE_BITS * EXACT_MAX_SLICES - 126)
    rest, ints = x, []
    for i in range(count):
        bits = EXACT_SLICE_BITS * (i + 1)
        m = jnp.trunc(rest * _power_of_two(bits - exponent))
        ints.append(m)
        rest = rest - m * _power_of_two(exponent - bits)
    return jnp.stack(ints), exponent


def _slice_pieces(x: jax.Array, axis: int, count: int) -> jax.Array:
    """`[count, *x.shape]`: the slices of `_slice_ints` times their units (floats, exact)."""
    ints, exponent = _slice_ints(x, axis, count)
    units = jnp.stack([_power_of_two(exponent - EXACT_SLICE_BITS * (i + 1)) for i in range(count)])
    return ints * units


def _units(exponent: jax.Array, count: int) -> jax.Array:
    """`[G, count, ...]` from exponents `[G, ...]`: 2**(exponent − 7·(i+1)) for each slice i."""
    return jnp.stack([_power_of_two(exponent - EXACT_SLICE_BITS * (i + 1)) for i in range(count)], axis=1)


# -- the reductions the model uses -----------------------------------------------------------


def sum_(x: jax.Array, axis: int = -1, keepdims: bool = False, *, precision: Precision = STANDARD) -> jax.Array:
    """Sum over `axis` in float32."""
    if precision.is_compensated:
        return compensated_sum(x, axis=axis, keepdims=keepdims)
    return jnp.sum(x.astype(jnp.float32), axis=axis, keepdims=keepdims)


def mean(x: jax.Array, axis: int = -1, keepdims: bool = False, *, precision: Precision = STANDARD) -> jax.Array:
    """Arithmetic mean over `axis` in float32."""
    return sum_(x, axis=axis, keepdims=keepdims, precision=precision) / x.shape[axis]


def mean_square(x: jax.Array, axis: int = -1, keepdims: bool = True, *,
                precision: Precision = STANDARD) -> jax.Array:
    """mean(x²) over `axis` — the RMSNorm statistic; squares are exact when compensated."""
    x = x.astype(jnp.float32)
    if precision.is_compensated:
        return compensated_dot(x, x, axis=axis, keepdims=keepdims) / x.shape[axis]
    return mean(x * x, axis=axis, keepdims=keepdims)


def softmax(x: jax.Array, axis: int = -1, where: jax.Array | None = None, *,
            precision: Precision = STANDARD) -> jax.Array:
    """Softmax over `axis`; entries where `where` is False get probability 0.

    At least one entry per row must be allowed (a causal row always allows
    its own position), so the denominator is never zero.
    """
    x = x.astype(jnp.float32)
    if where is not None:
        x = jnp.where(where, x, -jnp.inf)
    shifted = x - jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
    unnormalised = exp(shifted, precision=precision)
    return unnormalised / sum_(unnormalised, axis=axis, keepdims=True, precision=precision)


def logsumexp(x: jax.Array, axis: int = -1, keepdims: bool = False, where: jax.Array | None = None, *,
              precision: Precision = STANDARD) -> jax.Array:
    """log(sum(exp(x))) over `axis`, over the entries where `where` is True (at least one per row)."""
    x = x.astype(jnp.float32)
    if where is not None:
        x = jnp.where(where, x, -jnp.inf)
    peak = jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
    out = peak + log(sum_(exp(x - peak, precision=precision), axis=axis, keepdims=True, precision=precision),
                     precision=precision)
    return out if keepdims else jnp.squeeze(out, axis=axis)


def log_softmax(x: jax.Array, axis: int = -1, *, precision: Precision = STANDARD) -> jax.Array:
    """log(softmax(x)) over `axis`, computed as x - max - log(sum(exp(x - max)))."""
    x = x.astype(jnp.float32)
    shifted = x - jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
    total = sum_(exp(shifted, precision=precision), axis=axis, keepdims=True, precision=precision)
    return shifted - log(total, precision=precision)
