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

import enum

import jax
import jax.numpy as jnp


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
    how much padding follows.
    """
    hi = jnp.moveaxis(hi.astype(jnp.float32), axis, -1)
    lo = jnp.zeros_like(hi) if lo is None else jnp.moveaxis(lo.astype(jnp.float32), axis, -1)
    n = hi.shape[-1]
    width = 1 << max(n - 1, 0).bit_length()  # the next power of two
    if width != n:
        padding = [(0, 0)] * (hi.ndim - 1) + [(0, width - n)]
        hi, lo = jnp.pad(hi, padding), jnp.pad(lo, padding)
    while hi.shape[-1] > 1:
        pairs = hi.shape[:-1] + (hi.shape[-1] // 2, 2)
        hi, lo = hi.reshape(pairs), lo.reshape(pairs)
        hi, lo = double_word_add(hi[..., 0], lo[..., 0], hi[..., 1], lo[..., 1])
    if keepdims:
        return jnp.moveaxis(hi, -1, axis), jnp.moveaxis(lo, -1, axis)
    return hi[..., 0], lo[..., 0]


def compensated_sum(x: jax.Array, axis: int = -1, keepdims: bool = False) -> jax.Array:
    """The sum over `axis`, close to the exact sum rounded once to float32."""
    hi, _ = double_word_sum(x, axis=axis, keepdims=keepdims)
    return hi  # normalised: hi is already fl(hi + lo)


def compensated_dot(a: jax.Array, b: jax.Array, axis: int = -1, keepdims: bool = False) -> jax.Array:
    """Σ a·b over `axis` with every product kept exactly (Dot2 of Ogita, Rump & Oishi, as a tree)."""
    p, e = two_product(a.astype(jnp.float32), b.astype(jnp.float32))
    hi, _ = double_word_sum(p, e, axis=axis, keepdims=keepdims)
    return hi


# -- the reductions the model uses -----------------------------------------------------------

# ULTRA's matmuls (the Ozaki scheme): K is cut into chunks of EXACT_CHUNK terms;
# within a chunk each row of x and each column of w is cut into EXACT_SLICES
# slices of EXACT_SLICE_BITS bits at a common power-of-two scale, so every
# slice-by-slice partial product is a sum of at most 2**(2 * 8 + 8) = 2**24
# integers times one scale: exact in float32, in any order, on any matmul
# unit. The chunk and slice results are then added by a compensated sum.
EXACT_CHUNK = 256
EXACT_SLICE_BITS = 8
EXACT_SLICES = 4  # 32 bits below each chunk's largest entry, beyond float32's 24


def matmul(x: jax.Array | tuple[jax.Array, jax.Array], w: jax.Array, *,
           precision: Precision = STANDARD) -> jax.Array:
    """x `[..., K]` @ w `[K, N]` (x a double-word only under ULTRA).

    STANDARD: XLA's matmul in the operands' dtype. HIGH: float32 at HIGHEST
    precision. ULTRA: error-free slice products (see EXACT_CHUNK), whose
    result does not depend on the matmul's order of accumulation, so it is
    the same whatever the batch.
    """
    if precision is Precision.ULTRA:
        return exact_matmul(x, w)[0]
    if isinstance(x, tuple):  # a double-word from an ULTRA-only path
        x = x[0]
    if precision is Precision.STANDARD:
        return x @ w
    return jnp.matmul(x.astype(jnp.float32), w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


def exact_matmul(x: jax.Array | tuple[jax.Array, jax.Array], w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """ULTRA's x @ w as a double-word (hi, lo): hi is the product rounded once.

    `x` may be a double-word itself: its lo part goes through the same
    error-free matmul (a plain one would round in an order that depends on
    the batch) and is added on.
    """
    x_hi, x_lo = x if isinstance(x, tuple) else (x, None)
    x_sgc = _slices(_k_chunks(x_hi.astype(jnp.float32), -1), axis=-1)  # [S, ..., G, C]
    w = w.astype(jnp.float32)
    w_sgcn = _slices(_k_chunks(w, 0), axis=1)  # [S, G, C, N]
    partial = jnp.einsum("i...gc,jgcn->...gijn", x_sgc, w_sgcn, precision=jax.lax.Precision.HIGHEST)
    hi, lo = double_word_sum(partial.reshape(partial.shape[:-4] + (-1, partial.shape[-1])), axis=-2)
    if x_lo is None:
        return hi, lo
    return double_word_add(hi, lo, *exact_matmul(x_lo, w))


def batched_matmul(a: jax.Array, b: jax.Array, *, precision: Precision = STANDARD) -> jax.Array:
    """a `[..., M, K]` @ b `[..., K, N]` over the same leading dimensions, in float32;
    ULTRA's is error-free as `matmul`'s."""
    if precision is Precision.ULTRA:
        return exact_batched_matmul(a, b)[0]
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST if precision.is_compensated else None)


def exact_batched_matmul(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """ULTRA's a @ b over leading dimensions, as a double-word (hi, lo)."""
    a_smgc = _slices(_k_chunks(a.astype(jnp.float32), -1), axis=-1)  # [S, ..., M, G, C]
    b_sgcn = _slices(_k_chunks(b.astype(jnp.float32), -2), axis=-2)  # [S, ..., G, C, N]
    partial = jnp.einsum("i...mgc,j...gcn->...mgijn", a_smgc, b_sgcn, precision=jax.lax.Precision.HIGHEST)
    return double_word_sum(partial.reshape(partial.shape[:-4] + (-1, partial.shape[-1])), axis=-2)


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


def _slices(x: jax.Array, axis: int) -> jax.Array:
    """`[EXACT_SLICES, *x.shape]`: x ≈ their sum; along `axis` each slice is an integer of at
    most EXACT_SLICE_BITS bits times one power of two (what is left after the last is dropped)."""
    _, exponent = jnp.frexp(jnp.max(jnp.abs(x), axis=axis, keepdims=True))  # |x| < 2**exponent
    rest, slices = x, []
    for i in range(EXACT_SLICES):
        unit = jnp.ldexp(jnp.float32(1.0), exponent - EXACT_SLICE_BITS * (i + 1))
        piece = jnp.round(rest / unit) * unit  # powers of two: every step is exact
        slices.append(piece)
        rest = rest - piece
    return jnp.stack(slices)


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
    unnormalised = jnp.exp(shifted)
    return unnormalised / sum_(unnormalised, axis=axis, keepdims=True, precision=precision)


def logsumexp(x: jax.Array, axis: int = -1, keepdims: bool = False, where: jax.Array | None = None, *,
              precision: Precision = STANDARD) -> jax.Array:
    """log(sum(exp(x))) over `axis`, over the entries where `where` is True (at least one per row)."""
    x = x.astype(jnp.float32)
    if where is not None:
        x = jnp.where(where, x, -jnp.inf)
    peak = jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
    out = peak + jnp.log(sum_(jnp.exp(x - peak), axis=axis, keepdims=True, precision=precision))
    return out if keepdims else jnp.squeeze(out, axis=axis)


def log_softmax(x: jax.Array, axis: int = -1, *, precision: Precision = STANDARD) -> jax.Array:
    """log(softmax(x)) over `axis`, computed as x - max - log(sum(exp(x - max)))."""
    x = x.astype(jnp.float32)
    shifted = x - jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
    return shifted - jnp.log(sum_(jnp.exp(shifted), axis=axis, keepdims=True, precision=precision))
