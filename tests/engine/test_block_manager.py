"""The KV block pool: allocation, ref counts, prefix caching, LRU reuse."""

from __future__ import annotations

import pytest

from engine.block_manager import BlockManager

BS = 4


def _pool(num_blocks=8, **kwargs):
    return BlockManager(num_blocks=num_blocks, block_size=BS, **kwargs)


def test_allocate_grows_tables_and_refuses_when_full():
    pool = _pool(4)
    assert pool.allocate("a", 5) and len(pool.block_table("a")) == 2
    assert pool.allocate("a", 8) and len(pool.block_table("a")) == 2  # still fits
    assert pool.blocks_needed("b", 9) == 3
    assert not pool.allocate("b", 9)  # only 2 left: refused, nothing taken
    assert pool.num_free_blocks == 2 and pool.block_table("b") == []
    assert pool.allocate("b", 8)
    assert pool.usage == 1.0
    pool.free("a")
    assert pool.num_free_blocks == 2 and pool.usage == 0.5


def test_prefix_hit_reuses_blocks_and_counts():
    pool = _pool()
    prompt = list(range(10))  # two full blocks and two tokens
    assert pool.reference_cached_prefix("a", prompt) == 0
    pool.allocate("a", len(prompt))
    pool.commit_computed("a", prompt, len(prompt))
    # Same prompt: both full blocks hit, the partial one is computed again.
    assert pool.reference_cached_prefix("b", prompt) == 8
    assert pool.block_table("b") == pool.block_table("a")[:2]
    assert (pool.prefix_cache_queries, pool.prefix_cache_hits) == (20, 8)
    # A prompt differing in the first block shares nothing (the hash is chained).
    other = [99] + prompt[1:]
    assert pool.reference_cached_prefix("c", other) == 0


def test_at_least_one_token_is_left_to_compute():
    pool = _pool()
    prompt = list(range(8))  # exactly two blocks
    pool.reference_cached_prefix("a", prompt)
    pool.allocate("a", 8)
    pool.commit_computed("a", prompt, 8)
    assert pool.reference_cached_prefix("b", prompt) == 4


def test_freed_cached_blocks_survive_until_needed_then_lru():
    pool = _pool(4)
    first, second = list(range(9)), list(range(100, 109))
    for seq, prompt in (("a", first), ("b", second)):
        pool.reference_cached_prefix(seq, prompt)
        pool.allocate(seq, 8)
        pool.commit_computed(seq, prompt, 8)
    pool.free("a")
    pool.free("b")
    assert pool.num_free_blocks == 4
    # Both prompts still hit after their sequences ended.
    assert pool.reference_cached_prefix("a2", first) == 8
    pool.free("a2")  # "a"'s blocks are now the most recently freed
    # Taking two blocks evicts the least recently freed: "b"'s.
    assert pool.allocate("x", 8)
    assert pool.reference_cached_prefix("b2", second) == 0
    assert pool.reference_cached_prefix("a3", first) == 8


def test_shared_blocks_are_freed_only_by_the_last_owner():
    pool = _pool(4)
    prompt = list(range(9))
    pool.reference_cached_prefix("a", prompt)
    pool.allocate("a", 9)
    pool.commit_computed("a", prompt, 9)
    assert pool.reference_cached_prefix("b", prompt) == 8  # the partial third block is not shared
    assert pool.block_table("b") == pool.block_table("a")[:2]
    assert pool.allocate("b", 10) and pool.block_table("b")[2] != pool.block_table("a")[2]
    pool.free("a")
    assert pool.num_free_blocks == 1  # a's partial block only
    pool.free("b")
    assert pool.num_free_blocks == 4


def test_duplicate_content_keeps_one_key():
    pool = _pool()
    prompt = list(range(8))
    for seq in ("a", "b"):  # computed concurrently: neither hit the other
        pool.reference_cached_prefix(seq, prompt)
        pool.allocate(seq, 8)
    pool.commit_computed("a", prompt, 8)
    pool.commit_computed("b", prompt, 8)
    assert pool.reference_cached_prefix("c", prompt + [1]) == 8
    assert pool.block_table("c") == pool.block_table("a")
    for seq in ("a", "b", "c"):
        pool.free(seq)
    assert pool.num_free_blocks == 8


def test_cache_salt_separates_entries():
    pool = _pool()
    prompt = list(range(9))
    pool.reference_cached_prefix("a", prompt, cache_salt=b"ultra")
    pool.allocate("a", 9)
    pool.commit_computed("a", prompt, 9, cache_salt=b"ultra")
    assert pool.reference_cached_prefix("b", prompt, cache_salt=b"standard") == 0
    assert pool.reference_cached_prefix("c", prompt, cache_salt=b"ultra") == 8


def test_prefix_caching_off_and_reset():
    pool = _pool(enable_prefix_caching=False)
    prompt = list(range(9))
    pool.reference_cached_prefix("a", prompt)
    pool.allocate("a", 9)
    pool.commit_computed("a", prompt, 9)
    assert pool.reference_cached_prefix("b", prompt) == 0
    cached = _pool()
    cached.reference_cached_prefix("a", prompt)
    cached.allocate("a", 9)
    cached.commit_computed("a", prompt, 9)
    cached.free("a")
    cached.reset_prefix_cache()
    assert cached.reference_cached_prefix("b", prompt) == 0 and cached.num_free_blocks == 8


def test_bad_sizes():
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=4)
