"""int8 weights: per-channel symmetric quantisation and the matmuls that read them.

A matrix `w [K, N]` is kept as int8 integers `q [K, N]` and one float32
scale per output channel `s [N]`, with `w ≈ q · s` (`s = max|w[:, n]| / 127`,
`q = round(w / s)`). The quantised model *is* `q · s`: every precision level
computes with those weights, not with the float ones they came from.

Two ways to multiply activations `x [M, K]` by such a weight (measured on
XLA:CPU per decode step and prefill by `python -m bench.roofline
--quantizations none int8 int8-dynamic`; both read 1 byte per weight):

- weight-only: `(x @ float(q)) · s` — the activations stay float, the
  integers convert inside the dot. Fastest for few rows: at M ≤ 16 the
  dot is bound by reading the weights, and a float dot has no
  quantisation to pay.
- dynamic: each row of `x` quantised to int8 with its own scale `r`
  (`r = max|x[m]| / 127`), an int8 × int8 → int32 dot (exact), then
  `· r · s`. XLA:CPU hands int8 dots to YNNPACK's VNNI kernels, which win
  from about 32 rows (decode of many sequences, prefill chunks); GPUs run
  them on integer tensor cores. YNNPACK runs a one-row int8 dot ~20×
  slower than four rows, so one-row calls are padded to `_MIN_INT8_ROWS`.

Quantised activations cost accuracy, though: a token's few large channels
set its scale, and the rest lose bits. On SmolLM2 the logits' rms error
against float32 grows from ~0.35 (int8 weights alone) to ~1.0 with the
layers' activations quantised too. So `int8` keeps the layers' activations
float, and `int8-dynamic` quantises them from DYNAMIC_MIN_ROWS rows, for
throughput under load. The LM head's input (final-normed, without such
outliers) is quantised in both: weight-only there materialises the whole
float head (the vocabulary is the largest matrix), 15× slower.

HIGH and ULTRA multiply the integers exactly (numerics' error-free
products: an integer of 7 bits is one slice) and scale the double-word
result by `s` with an accurate double-word product, elementwise, so a
row's result still does not depend on its batch (numerics.exact_matmul).
"""

from __future__ import annotations

import dataclasses
import enum
import functools

import jax
import jax.numpy as jnp

# From this many rows the dynamic (int8 × int8) dot beats the weight-only one (see above).
DYNAMIC_MIN_ROWS = 32
_MIN_INT8_ROWS = 4
_INT8_MAX = 127


class Quantization(enum.Enum):
    NONE = "none"
    INT8 = "int8"  # int8 weights, float activations (the LM head's quantised: see above)
    INT8_DYNAMIC = "int8-dynamic"  # also the layers' activations, per token, from DYNAMIC_MIN_ROWS rows

    @property
    def dynamic_from_rows(self) -> int | None:
        """From how many rows the layers' matmuls quantise their activations (None: never)."""
        return DYNAMIC_MIN_ROWS if self is Quantization.INT8_DYNAMIC else None


CHOICES = tuple(q.value for q in Quantization)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["ints", "scale"],
                   meta_fields=["dynamic_from_rows"])
@dataclasses.dataclass(frozen=True)
class Int8Weight:
    """`ints · scale`: a matrix `[..., K, N]` as int8 with one scale per column
    (leading dimensions, such as stacked layers, in front of both)."""

    ints: jax.Array  # [..., K, N] int8 (under HIGH/ULTRA, the integers' numerics.SlicedWeight)
    scale: jax.Array  # [..., N] float32
    dynamic_from_rows: int | None = None  # matmul quantises activations from this many rows

    @property
    def shape(self) -> tuple[int, ...]:
        return self.ints.shape


def quantize(w: jax.Array, *, axis: int = -2) -> tuple[jax.Array, jax.Array]:
    """(int8 integers shaped as `w`, float32 scales without `axis`): per channel over `axis`,
    the matrix's contraction axis (-2 for `[K, N]`, -1 for an embedding table `[V, D]`)."""
    w = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=axis) / _INT8_MAX
    scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero channel stays zero
    ints = jnp.clip(jnp.round(w / jnp.expand_dims(scale, axis)), -_INT8_MAX, _INT8_MAX)
    return ints.astype(jnp.int8), scale


def dequantize(w: Int8Weight) -> jax.Array:
    """The float32 matrix the model computes with."""
    return w.ints.astype(jnp.float32) * w.scale[..., None, :]


def embed(ints_vd: jax.Array, scale_v: jax.Array, token_ids: jax.Array, dtype) -> jax.Array:
    """Rows of a quantised embedding table `[V, D]` (one scale per token) in `dtype`."""
    return (ints_vd[token_ids].astype(jnp.float32) * scale_v[token_ids][..., None]).astype(dtype)


def matmul(x: jax.Array, w: Int8Weight, *, dynamic: bool | None = None) -> jax.Array:
    """x `[..., K]` @ (w.ints · w.scale) `[K, N]` → `[..., N]` in x's dtype.

    `dynamic`: quantise the activations per row (True), keep them float (False), or as the
    weight says (None: from `w.dynamic_from_rows` rows).
    """
    rows = x.size // x.shape[-1]
    if dynamic is None:
        dynamic = w.dynamic_from_rows is not None and rows >= w.dynamic_from_rows
    if not dynamic:
        return ((x @ w.ints.astype(x.dtype)) * w.scale).astype(x.dtype)
    return _dynamic(x, w.ints, w.scale, contracting=0)


def matmul_transposed(x: jax.Array, ints_nk: jax.Array, scale_n: jax.Array) -> jax.Array:
    """x `[..., K]` @ (ints_nk · scale_n[:, None])ᵀ → `[..., N]`, activations quantised: the tied
    LM head, read in the embedding's own `[V, D]` layout. Given as `embedding.T`, XLA:CPU kept the
    transpose in front of the int8 dot and ran it 40× slower than this form."""
    return _dynamic(x, ints_nk, scale_n, contracting=1)


def _dynamic(x: jax.Array, ints: jax.Array, scale_n: jax.Array, *, contracting: int) -> jax.Array:
    """Each row of x to int8 with its own scale, an exact int8 × int8 → int32 dot with `ints`
    (contracted over its axis `contracting`), both scales applied."""
    rows = x.size // x.shape[-1]
    x_mk = x.reshape(rows, x.shape[-1]).astype(jnp.float32)
    if rows < _MIN_INT8_ROWS:
        x_mk = jnp.pad(x_mk, ((0, _MIN_INT8_ROWS - rows), (0, 0)))
    x_ints, x_scale_m = quantize(x_mk, axis=-1)
    y_mn = jax.lax.dot_general(x_ints, ints, (((1,), (contracting,)), ((), ())),
                               preferred_element_type=jnp.int32)
    y_mn = y_mn.astype(jnp.float32) * x_scale_m[:, None] * scale_n
    return y_mn[:rows].reshape(x.shape[:-1] + scale_n.shape).astype(x.dtype)
