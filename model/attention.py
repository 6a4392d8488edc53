"""Attention over the paged KV cache, behind one interface, by one of two backends.

- XLA, the gather path: each sequence's pages are gathered into `[B, K, S, H]`
  keys and values and attended to with plain matmuls and `numerics.softmax`.
  It is the reference, the CPU path, and the only path of HIGH and ULTRA
  (whose reductions and matmuls must be numerics' own).
- PALLAS, the kernels (STANDARD only):
  - decode (one new token per row): JAX's Pallas GPU paged-attention kernel,
    which reads the pages in place through the block table, without a gather;
  - prefill and prompt chunks (T > 1): the chunk's pages gathered, then one
    fused dense attention, `jax.nn.dot_product_attention` (cuDNN's flash
    attention on a GPU; XLA elsewhere). No JAX-native kernel does ragged paged
    prefill on GPUs, and a chunk reads each page once for all T queries, so the
    gather costs 1/T of what it costs a decode.
  Off a GPU the Pallas kernel runs in interpret mode: the same kernel, slowly,
  so CPU tests and users can exercise it.

Sliding-window models (Mistral) decode on the gather path: the kernel has no window.
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import paged_attention as pallas_paged

from model import numerics
from model.kv_cache import read_layer
from model.numerics import Precision


class AttentionBackend(enum.Enum):
    XLA = "xla"
    PALLAS = "pallas"


CHOICES = ("auto",) + tuple(b.value for b in AttentionBackend)  # what `--attention-backend` takes


def choose_backend(choice: str, *, precision: Precision, platform: str, num_devices: int = 1) -> AttentionBackend:
    """What `--attention-backend` (auto, xla or pallas) means for one precision level on one platform:
    `auto` is the kernels on one GPU and the gather path elsewhere; HIGH and ULTRA always gather.

    On a mesh of several GPUs `auto` gathers too: XLA cannot partition a Pallas
    kernel's custom call over the sharded KV heads (it would gather the whole
    cache onto every device), and the kernels are not yet wrapped in a shard_map.
    """
    if choice not in CHOICES:
        raise ValueError(f"attention backend must be auto, xla or pallas, got {choice!r}")
    if precision.is_compensated or choice == "xla":
        return AttentionBackend.XLA
    if choice == "pallas" or (platform == "gpu" and num_devices == 1):
        return AttentionBackend.PALLAS
    return AttentionBackend.XLA


# The decode kernel splits each row's block table into partitions of
# DECODE_PAGES_PER_SPLIT pages, runs them in parallel, and combines their
# partial softmaxes at the end. The split size is fixed, and block tables are
# padded to a whole number of splits, so a row is cut at the same pages
# whatever table width (page bucket) its batch has: the partitions past its
# length are empty (no page read, weight exactly 0 in the combination), and
# its result does not change with the batch it runs in.
DECODE_PAGES_PER_SPLIT = 16
DECODE_PAGES_PER_BLOCK = 8  # pages one inner step of the kernel reads (8 × 16 tokens by default)


def paged_decode(q_bnh: jax.Array, k_pages_kpsh: jax.Array, v_pages_kpsh: jax.Array,
                 block_tables_bp: jax.Array, lengths_b: jax.Array) -> jax.Array:
    """One query per row over its first `lengths_b` cached positions, by the Pallas kernel: `[B, N, H]`.

    q_bnh: rotated queries, not yet scaled (the kernel has no scale argument).
    k_pages_kpsh, v_pages_kpsh: one layer of the cache, `[K, num_pages, page_size, H]`.
    block_tables_bp: `[B, P]` page ids; lengths_b: `[B]` int32, at least 1.
    """
    head_dim = q_bnh.shape[-1]
    p = block_tables_bp.shape[1]
    padded = -(-p // DECODE_PAGES_PER_SPLIT) * DECODE_PAGES_PER_SPLIT
    # Page 0 stands in for the padding: past every length, so never weighed.
    block_tables_bp = jnp.pad(block_tables_bp, ((0, 0), (0, padded - p)))
    q_bnh = (q_bnh.astype(jnp.float32) * head_dim ** -0.5).astype(k_pages_kpsh.dtype)
    out_bnh = pallas_paged.paged_attention(
        q_bnh, k_pages_kpsh, v_pages_kpsh, block_tables_bp, lengths_b.astype(jnp.int32),
        k_splits=padded // DECODE_PAGES_PER_SPLIT, pages_per_compute_block=DECODE_PAGES_PER_BLOCK,
        interpret=jax.devices()[0].platform != "gpu")
    return out_bnh.astype(jnp.float32)


def fused_dense(q_btnh: jax.Array, keys_bksh: jax.Array, values_bksh: jax.Array,
                is_visible_bts: jax.Array) -> jax.Array:
    """Queries over gathered keys and values by `jax.nn.dot_product_attention`: `[B, T, N, H]` float32.

    cuDNN's fused kernel on a GPU (where it takes the shapes and dtype), XLA's otherwise;
    both keep the scores and the softmax in float32.
    """
    keys_bskh, values_bskh = (jnp.swapaxes(a, 1, 2).astype(q_btnh.dtype) for a in (keys_bksh, values_bksh))
    mask_b1ts = is_visible_bts[:, None]
    if jax.devices()[0].platform == "gpu" and q_btnh.dtype in (jnp.bfloat16, jnp.float16):
        try:
            out = jax.nn.dot_product_attention(q_btnh, keys_bskh, values_bskh, mask=mask_b1ts,
                                               implementation="cudnn")
            return out.astype(jnp.float32)
        except (NotImplementedError, ValueError, RuntimeError):
            pass  # a shape cuDNN does not take: XLA's below
    out = jax.nn.dot_product_attention(q_btnh, keys_bskh, values_bskh, mask=mask_b1ts, implementation="xla")
    return out.astype(jnp.float32)


def gathered(q_btnh: jax.Array, keys_bksh: jax.Array, values_bksh: jax.Array, is_visible_bts: jax.Array,
             *, precision: Precision):
    """The gather path's attention: `[B, T, N·H]` (float32; a double-word (hi, lo) under ULTRA)."""
    b, t, num_heads, head_dim = q_btnh.shape
    kv_heads = keys_bksh.shape[1]
    g = num_heads // kv_heads
    # Grouped-query attention: the G query heads of each KV head, all T
    # tokens, form one [G*T, H] block, so (B, K) lead every operand and the
    # matmuls batch over them without copying keys or values.
    q_bkqh = q_btnh.reshape(b, t, kv_heads, g, head_dim).transpose(0, 2, 3, 1, 4) \
        .reshape(b, kv_heads, g * t, head_dim)
    # Keys as the left operand: [S, H] @ [H, G*T] has a long M; at decode
    # (G*T small) XLA:CPU ran q @ keys^T several times slower.
    if precision is Precision.STANDARD:
        scores_bksq = jnp.einsum("bksh,bkqh->bksq", keys_bksh.astype(jnp.float32), q_bkqh.astype(jnp.float32))
    else:
        scores_bksq = numerics.batched_matmul(keys_bksh, jnp.swapaxes(q_bkqh, -1, -2), precision=precision)
    scores_bksq = scores_bksq * head_dim ** -0.5
    scores_bkgts = jnp.swapaxes(scores_bksq, -1, -2).reshape(b, kv_heads, g, t, -1)
    probs_bkgts = numerics.softmax(scores_bkgts, axis=-1, where=is_visible_bts[:, None, None], precision=precision)
    probs_bkqs = probs_bkgts.reshape(b, kv_heads, g * t, -1)
    if precision is Precision.STANDARD:
        out_bkqh = jnp.einsum("bkqs,bksh->bkqh", probs_bkqs, values_bksh.astype(jnp.float32))
    else:
        out_bkqh = numerics.exact_attention_values(probs_bkqs, values_bksh, precision=precision)
        if precision is Precision.HIGH:
            out_bkqh = out_bkqh[0]

    def heads_last(out_bkqh):
        return out_bkqh.reshape(b, kv_heads, g, t, head_dim).transpose(0, 3, 1, 2, 4) \
            .reshape(b, t, num_heads * head_dim)

    return jax.tree.map(heads_last, out_bkqh)


def paged(q_btnh: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array,
          block_tables_bp: jax.Array, positions_bt: jax.Array, is_visible_bts: jax.Array, *,
          precision: Precision, backend: AttentionBackend, has_sliding_window: bool):
    """Attention of this step's queries over the cache (their own keys already written): `[B, T, N·H]`.

    k_cache, v_cache: the whole cache, `[L, K, num_pages, page_size, H]`; `layer` picks one.
    positions_bt: each query's absolute position; is_visible_bts: which of the
    block table's P·page_size key positions each query sees (causal, windowed).
    """
    b, t, num_heads, head_dim = q_btnh.shape
    if backend is AttentionBackend.PALLAS:
        if precision is not Precision.STANDARD:
            raise ValueError("the Pallas kernels compute at STANDARD precision only")
        if t == 1 and not has_sliding_window:
            out_bnh = paged_decode(q_btnh[:, 0], k_cache[layer], v_cache[layer], block_tables_bp,
                                   positions_bt[:, 0] + 1)
            return out_bnh.reshape(b, 1, num_heads * head_dim)
        if t > 1:
            out_btnh = fused_dense(q_btnh, read_layer(k_cache, layer, block_tables_bp),
                                   read_layer(v_cache, layer, block_tables_bp), is_visible_bts)
            return out_btnh.reshape(b, t, num_heads * head_dim)
    return gathered(q_btnh, read_layer(k_cache, layer, block_tables_bp), read_layer(v_cache, layer, block_tables_bp),
                    is_visible_bts, precision=precision)
