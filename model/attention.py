"""Attention over the paged KV cache, behind one interface, by one of two backends.

- XLA, plain JAX:
  - at STANDARD, `blockwise`: the keys in blocks of KEY_BLOCK_PAGES pages with an
    online softmax, in a loop that runs only as many blocks as the batch's
    longest row reaches. The block table is always the full width, so one
    program serves every context length: no page-count buckets to compile
    (SmolLM2 at 8192 tokens: 33 forward programs instead of 285), and the
    reads follow the live context in steps of one block, not of a power of two.
  - `gathered`, each sequence's pages gathered into `[B, K, S, H]` keys and
    values and attended to with plain matmuls and `numerics.softmax`: the
    reference, and the path of HIGH and ULTRA (whose reductions and matmuls
    must be numerics' own, over every key at once).
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


# Keys per loop step of `blockwise`, in pages (64 tokens at the default 16 per page). Smaller
# blocks follow the context more closely but pay the loop's per-step overhead more often.
# A SmolLM2 decode step of 64 rows on 2 cores, at 170 / 1000 tokens of context: 2 pages
# 388 / 932 ms, 4 pages 242 / 622 ms, 8 pages 346 / 886 ms (the gather path with
# power-of-two page buckets: ~266 / ~577 ms, over 285 programs instead of 33).
KEY_BLOCK_PAGES = 4


def blockwise(q_btnh: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array,
              block_tables_bp: jax.Array, positions_bt: jax.Array, sliding_window: int | None) -> jax.Array:
    """STANDARD attention over the cache, KEY_BLOCK_PAGES pages of keys at a time: `[B, T, N·H]` float32.

    An online softmax (Milakov & Gimelshein, 2018; as in flash attention) carries each
    query's running maximum, denominator and weighted sum of values from block to block.
    The loop's trip count is a traced value, the blocks the longest row of the batch
    reaches, so the block table can be as wide as the longest allowed context in every
    call. A block a row does not reach is all masked: its scores are -inf, the running
    maximum and sums stay as they were (scaled by exp(0) = 1), so a row's result does not
    depend on how far the other rows of its batch reach.
    """
    b, t, num_heads, head_dim = q_btnh.shape
    kv_heads, page_size = k_cache.shape[1], k_cache.shape[3]
    g = num_heads // kv_heads
    # Page 0 stands in for a last part block's missing pages: past every row's reach, so masked.
    block_tables_bp = jnp.pad(block_tables_bp, ((0, 0), (0, -block_tables_bp.shape[1] % KEY_BLOCK_PAGES)))
    keys_per_block = KEY_BLOCK_PAGES * page_size
    # As in `gathered`: the G query heads of a KV head and all T tokens form one block of G·T queries.
    q_bkqh = (q_btnh.astype(jnp.float32) * head_dim ** -0.5).reshape(b, t, kv_heads, g, head_dim) \
        .transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, head_dim)
    positions_bq = jnp.broadcast_to(positions_bt[:, None, :], (b, g, t)).reshape(b, 1, g * t)
    num_blocks = jnp.max(positions_bt) // keys_per_block + 1

    def step(i, carry):
        peak_bkq, total_bkq, acc_bkqh = carry
        tables_bj = jax.lax.dynamic_slice_in_dim(block_tables_bp, i * KEY_BLOCK_PAGES, KEY_BLOCK_PAGES, axis=1)
        keys_bksh = read_layer(k_cache, layer, tables_bj).astype(jnp.float32)
        values_bksh = read_layer(v_cache, layer, tables_bj).astype(jnp.float32)
        key_positions_s = i * keys_per_block + jnp.arange(keys_per_block)
        is_visible_bqs = key_positions_s[None, None, :] <= positions_bq[..., None]
        if sliding_window is not None:
            is_visible_bqs &= key_positions_s[None, None, :] > positions_bq[..., None] - sliding_window
        scores_bkqs = jnp.where(is_visible_bqs, jnp.einsum("bkqh,bksh->bkqs", q_bkqh, keys_bksh), -jnp.inf)
        new_peak_bkq = jnp.maximum(peak_bkq, jnp.max(scores_bkqs, axis=-1))
        scale_bkq = jnp.exp(peak_bkq - new_peak_bkq)
        probs_bkqs = jnp.exp(scores_bkqs - new_peak_bkq[..., None])
        total_bkq = total_bkq * scale_bkq + numerics.sum_(probs_bkqs, axis=-1)
        acc_bkqh = acc_bkqh * scale_bkq[..., None] + jnp.einsum("bkqs,bksh->bkqh", probs_bkqs, values_bksh)
        return new_peak_bkq, total_bkq, acc_bkqh

    # A finite floor for the running maximum: exp(floor - floor) is 1, never NaN, before a
    # row's first visible key (a window can hide a row's whole first blocks).
    floor = jnp.finfo(jnp.float32).min
    start = (jnp.full((b, kv_heads, g * t), floor), jnp.zeros((b, kv_heads, g * t)),
             jnp.zeros((b, kv_heads, g * t, head_dim)))
    _, total_bkq, acc_bkqh = jax.lax.fori_loop(0, num_blocks, step, start)
    out_bkqh = acc_bkqh / total_bkq[..., None]
    return out_bkqh.reshape(b, kv_heads, g, t, head_dim).transpose(0, 3, 1, 2, 4).reshape(b, t, num_heads * head_dim)


def paged(q_btnh: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array,
          block_tables_bp: jax.Array, positions_bt: jax.Array, *, sliding_window: int | None,
          precision: Precision, backend: AttentionBackend):
    """Attention of this step's queries over the cache (their own keys already written): `[B, T, N·H]`.

    k_cache, v_cache: the whole cache, `[L, K, num_pages, page_size, H]`; `layer` picks one.
    positions_bt: each query's absolute position; it sees the keys at positions up to its own
    (and, with a sliding window, the last `sliding_window` of them).
    """
    b, t, num_heads, head_dim = q_btnh.shape
    if backend is AttentionBackend.XLA and precision is Precision.STANDARD:
        return blockwise(q_btnh, k_cache, v_cache, layer, block_tables_bp, positions_bt, sliding_window)
    if backend is AttentionBackend.PALLAS:
        if precision is not Precision.STANDARD:
            raise ValueError("the Pallas kernels compute at STANDARD precision only")
        if t == 1 and sliding_window is None:
            out_bnh = paged_decode(q_btnh[:, 0], k_cache[layer], v_cache[layer], block_tables_bp,
                                   positions_bt[:, 0] + 1)
            return out_bnh.reshape(b, 1, num_heads * head_dim)
    is_visible_bts = visible_keys(positions_bt, block_tables_bp.shape[1] * k_cache.shape[3], sliding_window)
    if backend is AttentionBackend.PALLAS and t > 1:
        out_btnh = fused_dense(q_btnh, read_layer(k_cache, layer, block_tables_bp),
                               read_layer(v_cache, layer, block_tables_bp), is_visible_bts)
        return out_btnh.reshape(b, t, num_heads * head_dim)
    return gathered(q_btnh, read_layer(k_cache, layer, block_tables_bp), read_layer(v_cache, layer, block_tables_bp),
                    is_visible_bts, precision=precision)


def visible_keys(positions_bt: jax.Array, num_keys: int, sliding_window: int | None) -> jax.Array:
    """`[B, T, S]`: which of the first `num_keys` positions each query sees (causal, windowed)."""
    key_positions_s = jnp.arange(num_keys)
    is_visible_bts = key_positions_s[None, None, :] <= positions_bt[:, :, None]
    if sliding_window is not None:
        is_visible_bts &= key_positions_s[None, None, :] > positions_bt[:, :, None] - sliding_window
    return is_visible_bts
