"""The paged KV block pool: ref-counted blocks, prefix caching, LRU reuse.

Plain Python over integers, no device code, so it is tested on its own.

Prefix caching: once a block is full and computed, it is keyed by a hash
chained from the previous block's hash and its own token ids (plus an
optional `cache_salt`, e.g. the precision level, since the same tokens give
different K/V under different numerics). A later sequence whose prompt
starts with the same full blocks references them instead of computing them.
A block whose last reference is dropped keeps its content and key and waits,
least recently freed first, until the pool needs it for something else.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Hashable, Sequence

import numpy as np


def chained_block_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """Key of a full block: a digest of the previous block's key and this block's tokens."""
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return digest.digest()


class BlockManager:
    """Hands out KV blocks to sequences (keyed by any hashable id)."""

    def __init__(self, *, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._never_cached = collections.deque(range(num_blocks))  # free, no reusable content
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # free, cached; LRU first
        self._block_by_key: dict[bytes, int] = {}
        self._key_by_block: dict[int, bytes] = {}
        self._tables: dict[Hashable, list[int]] = {}
        self._keys: dict[Hashable, list[bytes]] = {}  # keys of each sequence's leading full blocks
        self.prefix_cache_queries = 0  # prompt tokens looked up
        self.prefix_cache_hits = 0  # of which found cached

    # -- pool state ---------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated now (including cached ones nobody references)."""
        return len(self._never_cached) + len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by at least one sequence."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def block_table(self, seq_id: Hashable) -> list[int]:
        return self._tables.get(seq_id, [])

    def blocks_needed(self, seq_id: Hashable, num_tokens: int) -> int:
        """New blocks `allocate(seq_id, num_tokens)` would take."""
        return max(0, -(-num_tokens // self.block_size) - len(self._tables.get(seq_id, ())))

    # -- sequence life cycle -------------------------------------------------
    def reference_cached_prefix(self, seq_id: Hashable, token_ids: Sequence[int], *,
                                cache_salt: bytes = b"") -> int:
        """Start `seq_id`'s table with the cached full blocks that prefix `token_ids`.

        Returns the number of tokens covered (a multiple of block_size). At
        least one token is always left to compute, so the step that computes
        it also produces the logits for the next token.
        """
        if self._tables.get(seq_id):
            raise ValueError(f"sequence {seq_id!r} already holds blocks")
        table, keys = self._tables.setdefault(seq_id, []), self._keys.setdefault(seq_id, [])
        self.prefix_cache_queries += len(token_ids)
        if not self.enable_prefix_caching:
            return 0
        key = cache_salt
        for start in range(0, len(token_ids) - 1 - self.block_size + 1, self.block_size):
            key = chained_block_hash(key, token_ids[start:start + self.block_size])
            block = self._block_by_key.get(key)
            if block is None:
                break
            if self._ref_counts[block] == 0:
                del self._evictable[block]
            self._ref_counts[block] += 1
            table.append(block)
            keys.append(key)
        num_cached = len(table) * self.block_size
        self.prefix_cache_hits += num_cached
        return num_cached

    def allocate(self, seq_id: Hashable, num_tokens: int) -> bool:
        """Grow `seq_id`'s table to cover positions [0, num_tokens).

        Returns False, changing nothing, when the pool has too few free blocks.
        """
        needed = self.blocks_needed(seq_id, num_tokens)
        if needed > self.num_free_blocks:
            return False
        table = self._tables.setdefault(seq_id, [])
        self._keys.setdefault(seq_id, [])
        for _ in range(needed):
            table.append(self._take_free_block())
        return True

    def commit_computed(self, seq_id: Hashable, token_ids: Sequence[int], num_computed: int, *,
                        cache_salt: bytes = b"") -> None:
        """Make the full blocks among the first `num_computed` tokens findable by later prompts."""
        if not self.enable_prefix_caching:
            return
        table, keys = self._tables[seq_id], self._keys[seq_id]
        num_full = min(num_computed // self.block_size, len(table))
        key = keys[-1] if keys else cache_salt
        for i in range(len(keys), num_full):
            key = chained_block_hash(key, token_ids[i * self.block_size:(i + 1) * self.block_size])
            keys.append(key)
            block = table[i]
            # Another sequence may have computed the same content meanwhile;
            # the first block keeps the key and this one stays anonymous.
            if key not in self._block_by_key and block not in self._key_by_block:
                self._block_by_key[key] = block
                self._key_by_block[block] = key

    def free(self, seq_id: Hashable) -> None:
        """Drop the sequence's references; unreferenced cached blocks become evictable."""
        table = self._tables.pop(seq_id, [])
        self._keys.pop(seq_id, None)
        # Tail first: a prompt's later blocks are evicted before its earlier
        # ones, which more prompts share.
        for block in reversed(table):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                if block in self._key_by_block:
                    self._evictable[block] = None
                else:
                    self._never_cached.append(block)

    def reset_prefix_cache(self) -> None:
        """Forget every cached key (e.g. after the weights change)."""
        for block in list(self._evictable):
            self._never_cached.append(block)
        self._evictable.clear()
        self._block_by_key.clear()
        self._key_by_block.clear()
        for keys in self._keys.values():
            keys.clear()

    def _take_free_block(self) -> int:
        if self._never_cached:
            block = self._never_cached.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)  # least recently freed
            del self._block_by_key[self._key_by_block.pop(block)]
        self._ref_counts[block] = 1
        return block
