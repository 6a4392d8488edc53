"""Single-sequence generation: prefill the prompt, then decode token by token.

This is the foundation's simple path (one sequence, pages allocated in
order from one preallocated cache). The engine issue replaces it with the
continuous-batching scheduler over a block manager; the model call and the
cache layout stay the same.
"""

from __future__ import annotations

from typing import Iterator

import jax.numpy as jnp
import numpy as np

from engine.model_runner import ModelRunner, bucket
from engine.sampling import SamplingParams, sample
from model.kv_cache import KVCache

# Tokens per KV page. 16 keeps the block table short while wasting at most
# 15 slots per sequence.
PAGE_SIZE = 16
# Prefill lengths are padded to a power of two of at least this many tokens,
# so short prompts share one compiled program.
MIN_PREFILL_BUCKET = 16
# Block tables hold at least this many pages (128 positions), so a short
# chat does not pay a recompile each time its context doubles.
MIN_PAGES_BUCKET = 8


class Generator:
    """Generates for one sequence at a time over a cache of `max_model_len` positions."""

    def __init__(self, runner: ModelRunner, *, eos_token_id: int | None,
                 max_model_len: int | None = None):
        cfg = runner.config
        self.runner = runner
        self.eos_token_id = eos_token_id
        self.max_model_len = max_model_len or min(cfg.max_position_embeddings, 8192)
        self._num_pages = -(-self.max_model_len // PAGE_SIZE)
        self._kv = KVCache.zeros(cfg, num_pages=self._num_pages, page_size=PAGE_SIZE)

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[int]:
        """Yield generated token ids; stops after max_tokens or at (and including) EOS."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                f"the maximum model length ({self.max_model_len})")
        seed = params.seed if params.seed is not None else int(np.random.SeedSequence().entropy % 2**31)

        # Prefill: the whole prompt in one padded row.
        t = bucket(len(prompt_ids), minimum=MIN_PREFILL_BUCKET)
        token_ids = np.zeros((1, t), np.int32)
        token_ids[0, :len(prompt_ids)] = prompt_ids
        is_valid = np.arange(t)[None] < len(prompt_ids)
        logits, self._kv = self.runner.forward(
            jnp.asarray(token_ids), jnp.arange(t, dtype=jnp.int32)[None], self._kv,
            self._block_table(len(prompt_ids)), jnp.asarray(is_valid))

        position = len(prompt_ids)
        for _ in range(params.max_tokens):
            token = int(sample(logits, jnp.asarray([params.temperature], jnp.float32),
                               jnp.asarray([params.top_p], jnp.float32),
                               jnp.asarray([seed], jnp.uint32), jnp.asarray([position]))[0])
            yield token
            if token == self.eos_token_id:
                return
            logits, self._kv = self.runner.forward(
                jnp.asarray([[token]], jnp.int32), jnp.asarray([[position]], jnp.int32), self._kv,
                self._block_table(position + 1), jnp.ones((1, 1), bool))
            position += 1

    def _block_table(self, num_positions: int) -> jnp.ndarray:
        # Pages are handed out in order; the table is padded to a power of
        # two so attention reads about as many pages as the context fills.
        num_pages = min(bucket(-(-num_positions // PAGE_SIZE), minimum=MIN_PAGES_BUCKET),
                        self._num_pages)
        return jnp.arange(num_pages, dtype=jnp.int32)[None]
