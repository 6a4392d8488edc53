"""The attention kernels (Pallas in interpret mode off a GPU; the fused dense prefill) and the
blockwise online softmax against the gather path, on random caches whose page tables are in
random order."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import attention
from model.attention import AttentionBackend
from model.kv_cache import read_layer
from model.numerics import Precision

PAGE_SIZE = 16
HEAD_DIM = 32
NUM_KV_HEADS = 2
NUM_PAGES = 128
TOLERANCE = 2e-6  # float32 throughout; the kernel's online softmax rounds in another order


def _cache(rng, dtype=jnp.float32):
    shape = (1, NUM_KV_HEADS, NUM_PAGES, PAGE_SIZE, HEAD_DIM)  # one layer
    return (jnp.asarray(rng.standard_normal(shape, np.float32), dtype),
            jnp.asarray(rng.standard_normal(shape, np.float32), dtype))


def _tables(rng, batch: int, width: int) -> np.ndarray:
    """Each row's pages distinct and in random order (rows may share pages, as prefix-cached ones do)."""
    return np.stack([rng.permutation(NUM_PAGES)[:width] for _ in range(batch)]).astype(np.int32)


def _attend(backend, q_btnh, k, v, tables_bp, positions_bt, precision=Precision.STANDARD, sliding_window=None):
    return np.asarray(attention.paged(
        jnp.asarray(q_btnh), k, v, jnp.int32(0), jnp.asarray(tables_bp), jnp.asarray(positions_bt),
        sliding_window=sliding_window, precision=precision, backend=backend))


def _gathered(q_btnh, k, v, tables_bp, positions_bt, sliding_window=None):
    """The reference: every key of the table gathered, one softmax over them."""
    tables = jnp.asarray(tables_bp)
    visible = attention.visible_keys(jnp.asarray(positions_bt), tables_bp.shape[1] * PAGE_SIZE, sliding_window)
    return np.asarray(attention.gathered(jnp.asarray(q_btnh), read_layer(k, jnp.int32(0), tables),
                                         read_layer(v, jnp.int32(0), tables), visible,
                                         precision=Precision.STANDARD))


@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("batch,width", [(1, 1), (4, 2), (8, 8), (4, 32)])
def test_decode_kernel_matches_the_gather_path(group, batch, width):
    rng = np.random.default_rng(group * 100 + width)
    k, v = _cache(rng)
    tables = _tables(rng, batch, width)
    # Lengths: one token, a page exactly, one past a page, the table's maximum, and random ones.
    lengths = [1, PAGE_SIZE, PAGE_SIZE + 1, width * PAGE_SIZE] + rng.integers(1, width * PAGE_SIZE + 1, 8).tolist()
    positions = np.minimum(np.asarray(lengths[:batch]), width * PAGE_SIZE)[:, None] - 1
    q = rng.standard_normal((batch, 1, NUM_KV_HEADS * group, HEAD_DIM)).astype(np.float32)
    kernel = _attend(AttentionBackend.PALLAS, q, k, v, tables, positions)
    reference = _gathered(q, k, v, tables, positions)
    np.testing.assert_allclose(kernel, reference, atol=TOLERANCE, rtol=0)


def test_a_decoded_row_has_the_same_bits_in_any_batch():
    """The split size is fixed, so a row's result does not depend on the table width
    (page bucket) or the number of rows its batch has."""
    rng = np.random.default_rng(7)
    k, v = _cache(rng)
    row_table = _tables(rng, 1, 3)
    q_row = rng.standard_normal((1, 1, NUM_KV_HEADS * 3, HEAD_DIM)).astype(np.float32)
    position = np.asarray([[2 * PAGE_SIZE + 5]])
    alone = _attend(AttentionBackend.PALLAS, q_row, k, v, np.pad(row_table, ((0, 0), (0, 1))), position)
    for batch, width in [(2, 4), (8, 32), (16, 64)]:
        tables = _tables(rng, batch, width)
        tables[batch - 1, :3] = row_table[0]
        q = rng.standard_normal((batch, 1, NUM_KV_HEADS * 3, HEAD_DIM)).astype(np.float32)
        q[batch - 1] = q_row[0]
        positions = rng.integers(0, width * PAGE_SIZE, (batch, 1))
        positions[batch - 1] = position[0]
        together = _attend(AttentionBackend.PALLAS, q, k, v, tables, positions)
        np.testing.assert_array_equal(together[batch - 1], alone[0])


@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("chunk_start,chunk_len,width", [(0, 16, 1), (0, 32, 4), (40, 16, 4), (100, 64, 16)])
def test_prefill_chunk_matches_the_gather_path(group, chunk_start, chunk_len, width):
    """A prompt chunk at any offset, several rows, the last one padded (its padding repeats its last position)."""
    rng = np.random.default_rng(group + chunk_start)
    k, v = _cache(rng)
    batch = 3
    tables = _tables(rng, batch, width)
    positions = np.broadcast_to(np.arange(chunk_start, chunk_start + chunk_len), (batch, chunk_len)).copy()
    positions[-1, chunk_len // 2:] = positions[-1, chunk_len // 2 - 1]
    q = rng.standard_normal((batch, chunk_len, NUM_KV_HEADS * group, HEAD_DIM)).astype(np.float32)
    kernel = _attend(AttentionBackend.PALLAS, q, k, v, tables, positions)
    reference = _gathered(q, k, v, tables, positions)
    np.testing.assert_allclose(kernel, reference, atol=TOLERANCE, rtol=0)


def test_bfloat16_cache_decodes_close_to_float32():
    """The kernel reads a bfloat16 cache as it is (queries cast to it); the softmax stays float32."""
    rng = np.random.default_rng(3)
    k, v = _cache(rng, jnp.bfloat16)
    tables = _tables(rng, 4, 8)
    positions = np.asarray([[0], [15], [16], [127]])
    q = rng.standard_normal((4, 1, NUM_KV_HEADS * 3, HEAD_DIM)).astype(np.float32)
    kernel = _attend(AttentionBackend.PALLAS, q, k, v, tables, positions)
    reference = _gathered(q, k.astype(jnp.float32), v.astype(jnp.float32), tables, positions)
    # Queries rounded to bfloat16 (8 bits) before the scores: about 2**-8 relative.
    np.testing.assert_allclose(kernel, reference, atol=0.05, rtol=0)


def test_the_kernels_refuse_compensated_precision():
    rng = np.random.default_rng(0)
    k, v = _cache(rng)
    q = rng.standard_normal((1, 1, NUM_KV_HEADS, HEAD_DIM)).astype(np.float32)
    with pytest.raises(ValueError, match="STANDARD"):
        _attend(AttentionBackend.PALLAS, q, k, v, _tables(rng, 1, 1), np.zeros((1, 1), int), Precision.HIGH)


@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("batch,width,chunk_len", [(1, 1, 1), (4, 8, 1), (8, 32, 1), (3, 4, 16), (2, 16, 64)])
@pytest.mark.parametrize("sliding_window", [None, 40])
def test_blockwise_matches_the_gather_path(group, batch, width, chunk_len, sliding_window):
    """Decodes and prompt chunks at any offset, rows of different reach (a whole block
    short of the table, a page exactly, one past a page), with and without a window."""
    rng = np.random.default_rng(group * 10 + width + chunk_len)
    k, v = _cache(rng)
    tables = _tables(rng, batch, width)  # widths of part blocks too
    ends = rng.integers(chunk_len, width * PAGE_SIZE + 1, batch)
    ends[0] = width * PAGE_SIZE
    if batch > 2:
        ends[1], ends[2] = max(PAGE_SIZE, chunk_len), max(PAGE_SIZE + 1, chunk_len)
    positions = ends[:, None] - chunk_len + np.arange(chunk_len)[None, :]
    q = rng.standard_normal((batch, chunk_len, NUM_KV_HEADS * group, HEAD_DIM)).astype(np.float32)
    blocks = _attend(AttentionBackend.XLA, q, k, v, tables, positions, sliding_window=sliding_window)
    reference = _gathered(q, k, v, tables, positions, sliding_window)
    np.testing.assert_allclose(blocks, reference, atol=TOLERANCE, rtol=0)


def test_a_blockwise_row_has_the_same_bits_however_far_its_batch_reaches():
    """The loop runs the blocks the longest row reaches; the blocks a shorter row does not
    reach leave its running sums exactly as they were."""
    rng = np.random.default_rng(11)
    k, v = _cache(rng)
    tables = _tables(rng, 2, 32)
    q = rng.standard_normal((2, 1, NUM_KV_HEADS * 3, HEAD_DIM)).astype(np.float32)
    short = _attend(AttentionBackend.XLA, q, k, v, tables, np.asarray([[20], [30]]))
    long = _attend(AttentionBackend.XLA, q, k, v, tables, np.asarray([[20], [32 * PAGE_SIZE - 1]]))
    np.testing.assert_array_equal(short[0], long[0])


@pytest.mark.parametrize("choice,precision,platform,expected", [
    ("auto", Precision.STANDARD, "gpu", AttentionBackend.PALLAS),
    ("auto", Precision.STANDARD, "cpu", AttentionBackend.XLA),
    ("auto", Precision.HIGH, "gpu", AttentionBackend.XLA),
    ("pallas", Precision.STANDARD, "cpu", AttentionBackend.PALLAS),
    ("pallas", Precision.ULTRA, "gpu", AttentionBackend.XLA),
    ("xla", Precision.STANDARD, "gpu", AttentionBackend.XLA),
])
def test_choose_backend(choice, precision, platform, expected):
    assert attention.choose_backend(choice, precision=precision, platform=platform) is expected


def test_auto_gathers_on_a_mesh_of_gpus():
    assert attention.choose_backend("auto", precision=Precision.STANDARD, platform="gpu",
                                    num_devices=2) is AttentionBackend.XLA


def test_choose_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="auto, xla or pallas"):
        attention.choose_backend("triton", precision=Precision.STANDARD, platform="gpu")


def test_interpret_mode_off_a_gpu():
    assert jax.devices()[0].platform == "cpu"  # CI and the development machines: the kernel is interpreted
