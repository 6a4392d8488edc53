"""The paged KV cache as arrays, and how a step reads and writes it.

Layout (shared/DESIGN.md, decision 2): per layer `[num_kv_heads, num_pages,
page_size, head_dim]`, the layout of JAX's GPU paged-attention kernel; the
layers are stacked in front so one `lax.scan` over layers carries the whole
cache and updates it in place. A sequence owns pages through its block table:
logical page j of a sequence holds its positions [j * page_size, (j+1) * page_size).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from model.config import DecoderConfig


class KVCache(NamedTuple):
    k: jax.Array  # [num_layers, num_kv_heads, num_pages, page_size, head_dim]
    v: jax.Array  # [num_layers, num_kv_heads, num_pages, page_size, head_dim]

    @property
    def num_pages(self) -> int:
        return self.k.shape[2]

    @property
    def page_size(self) -> int:
        return self.k.shape[3]

    @staticmethod
    def bytes_per_page(cfg: DecoderConfig, *, page_size: int, dtype, num_kv_heads: int | None = None) -> int:
        """Bytes one page takes in every layer, K and V, for `num_kv_heads` heads (default: all;
        a device of a tensor-parallel mesh holds its share): what a memory budget is divided by."""
        num_kv_heads = cfg.num_kv_heads if num_kv_heads is None else num_kv_heads
        return 2 * cfg.num_layers * num_kv_heads * page_size * cfg.head_dim * jnp.dtype(dtype).itemsize

    @classmethod
    def zeros(cls, cfg: DecoderConfig, *, num_pages: int, page_size: int,
              dtype=jnp.float32, sharding: jax.sharding.Sharding | None = None) -> "KVCache":
        """An empty cache; with `sharding`, each device allocates only its own shard."""
        shape = (cfg.num_layers, cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)
        make = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
        return cls(make(), make())


def write_slots(positions_bt: jax.Array, block_tables_bp: jax.Array, is_valid_bt: jax.Array,
                *, num_pages: int, page_size: int) -> tuple[jax.Array, jax.Array]:
    """Where each token's K/V goes: (page index, slot in page), each `[B, T]`.

    Padding tokens get page index `num_pages`, one past the end: scatters use
    mode="drop", so XLA skips them and no real page is touched.
    """
    logical_page_bt = positions_bt // page_size
    page_bt = jnp.take_along_axis(block_tables_bp, logical_page_bt, axis=1, mode="clip")
    page_bt = jnp.where(is_valid_bt, page_bt, num_pages)
    return page_bt, positions_bt % page_size


def write_layer(cache_lkpsh: jax.Array, layer: jax.Array, new_btkh: jax.Array,
                page_bt: jax.Array, slot_bt: jax.Array) -> jax.Array:
    """Scatter this step's keys (or values) `[B, T, K, H]` into one layer."""
    layer_bt = jnp.broadcast_to(layer, page_bt.shape)
    # Index arrays around a slice: numpy rules put the [B, T] index dims
    # first, so the update is laid out [B, T, K, H], as `new_btkh` is.
    return cache_lkpsh.at[layer_bt, :, page_bt, slot_bt, :].set(
        new_btkh.astype(cache_lkpsh.dtype), mode="drop")


def read_layer(cache_lkpsh: jax.Array, layer: jax.Array, block_tables_bp: jax.Array) -> jax.Array:
    """Gather a layer's keys (or values) for each sequence's pages: `[B, K, P * page_size, H]`.

    Only the P pages in the (bucketed) block table are read, so attention
    cost follows the live context rather than the maximum length. Each
    gathered slice is one head's page, contiguous in this layout, and the
    result comes out with (B, K) leading, as the attention matmuls want it,
    so XLA needs no transpose copy.
    """
    num_kv_heads = cache_lkpsh.shape[1]
    heads_k = jnp.arange(num_kv_heads)[None, :, None]  # [1, K, 1]
    # Adjacent index arrays broadcast to [B, K, P]; the sliced dims follow.
    pages_bkpsh = cache_lkpsh[layer, heads_k, block_tables_bp[:, None, :]]
    b, k, p, s, h = pages_bkpsh.shape
    return pages_bkpsh.reshape(b, k, p * s, h)
