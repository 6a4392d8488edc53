"""The padded sizes XLA compiles for: one program per bucket, so the set stays small.

The runner pads rows, tokens and pages to powers of two; the sampler pads
its per-row lists (history, bias, bans) the same way; the embedder pads
rows to powers of two and tokens to multiples of EMBED_TOKEN_STEP.
"""

from __future__ import annotations


def bucket(n: int, *, minimum: int = 1, factor: int = 2) -> int:
    """Smallest `minimum`·factor^k ≥ n (a power of two by default): the padded size XLA compiles for."""
    size = minimum
    while size < n:
        size *= factor
    return size


def powers_of_two(limit: int) -> list[int]:
    """1, 2, 4, … up to `limit` (itself a power of two): every bucket up to it."""
    return [2 ** i for i in range(limit.bit_length())]


# Embedder inputs: token counts are padded to a multiple of this, not to a
# power of two: on 256 sentences of 5–120 tokens, power-of-two lengths padded
# so much that embedding took 4.8 s instead of 3.5 s.
EMBED_TOKEN_STEP = 16


def embed_length_bucket(n: int, *, maximum: int) -> int:
    """`n` tokens rounded up to a multiple of EMBED_TOKEN_STEP, at most `maximum` (the
    position table's size, a multiple or not)."""
    return min(-(-n // EMBED_TOKEN_STEP) * EMBED_TOKEN_STEP, maximum)
