"""Sentence embeddings from an encoder or a decoder: batched, padded to
bucketed shapes, attention-masked; no KV cache.

Both model families expose `hidden_states(token_ids_bt, is_valid_bt)`: a
BERT encoder attends both ways, a decoder causally (its last valid token has
seen the whole input, which is why decoders pool the last token by default).

Inputs are sorted by length and cut into batches of at most `max_batch_size`
rows, each padded to a power-of-two number of rows and to a multiple of
EMBED_TOKEN_STEP tokens (engine.buckets), so a bounded set of programs
compiles. Padding rows and positions are masked out of attention and pooling.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Sequence

import jax
import numpy as np
from flax import nnx

from engine.buckets import bucket, embed_length_bucket
from engine.outputs import ModelInfo, RejectedField, RequestRejected
from model.pooling import PoolingConfig, PoolingMode, pool

if TYPE_CHECKING:
    from checkpoints.encoder_dir import LoadedEncoder
    from checkpoints.loader import LoadedModel
    from checkpoints.tokenizer import Tokenizer


class Embedder:
    def __init__(self, model: nnx.Module, tokenizer: Tokenizer, *, pooling: PoolingConfig, max_length: int,
                 max_batch_size: int = 32):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = max_length  # longest input in tokens, special tokens included
        self.max_batch_size = max_batch_size
        self.dimensions = model.config.hidden_size
        self.vocab_size = model.config.vocab_size
        self._max_positions = model.config.max_position_embeddings
        self.info = ModelInfo(tokenizer=tokenizer, vocab_size=self.vocab_size, max_model_len=max_length)
        self.graphdef, self.state = nnx.split(model)  # the state shares the model's arrays

    @classmethod
    def for_encoder(cls, loaded: LoadedEncoder, *, max_batch_size: int = 32) -> "Embedder":
        """A sentence-transformers folder's model, pooling and normalisation, as the folder says."""
        return cls(loaded.model, loaded.tokenizer, pooling=loaded.pooling, max_length=loaded.max_length,
                   max_batch_size=max_batch_size)

    @classmethod
    def for_decoder(cls, loaded: LoadedModel, *, pooling: PoolingMode = PoolingMode.LAST,
                    max_length: int | None = None, max_batch_size: int = 32) -> "Embedder":
        """A decoder's final-normed hidden states, pooled (last token or mean) and L2-normalised
        (unit vectors, as OpenAI's embeddings are)."""
        if pooling not in (PoolingMode.LAST, PoolingMode.MEAN):
            raise ValueError(f"decoder embeddings pool the last token or the mean, not {pooling.value}")
        return cls(loaded.model, loaded.tokenizer, pooling=PoolingConfig(mode=pooling, normalize=True),
                   max_length=max_length or loaded.config.max_position_embeddings,
                   max_batch_size=max_batch_size)

    def encode(self, texts: Sequence[str], *, truncate: bool = False) -> list[list[int]]:
        """Token ids of each text (special tokens added); over-long texts are an error unless `truncate`."""
        ids = [self.tokenizer.encode(t, max_length=self.max_length if truncate else None) for t in texts]
        self.check(ids)
        return ids

    def check(self, token_ids: Sequence[Sequence[int]]) -> None:
        """Raise RequestRejected naming the first input that cannot be embedded: the one
        contract of what the embedder accepts."""
        for i, row in enumerate(token_ids):
            if not row:
                raise RequestRejected(f"input {i} is empty", field=RejectedField.PROMPT)
            if len(row) > self.max_length:
                raise RequestRejected(f"input {i} has {len(row)} tokens; this model takes at most "
                                      f"{self.max_length}", field=RejectedField.PROMPT, is_context_length=True)
            if min(row) < 0 or max(row) >= self.vocab_size:
                raise RequestRejected(f"input {i}: token ids must be in [0, {self.vocab_size})",
                                      field=RejectedField.PROMPT)

    def embed(self, token_ids: Sequence[Sequence[int]], *, normalize: bool | None = None) -> np.ndarray:
        """One float32 vector `[N, D]` per input, pooled; L2-normalised when `normalize`
        (None: as the model says)."""
        self.check(token_ids)
        pooling = self.pooling if normalize is None else dataclasses.replace(self.pooling, normalize=normalize)
        order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
        out = np.zeros((len(token_ids), self.dimensions), np.float32)
        for start in range(0, len(order), self.max_batch_size):
            rows = order[start:start + self.max_batch_size]
            b = bucket(len(rows))
            t = embed_length_bucket(max(len(token_ids[i]) for i in rows), maximum=self._max_positions)
            ids_bt = np.zeros((b, t), np.int32)
            valid_bt = np.zeros((b, t), bool)
            for r, i in enumerate(rows):
                ids_bt[r, :len(token_ids[i])] = token_ids[i]
                valid_bt[r, :len(token_ids[i])] = True
            valid_bt[len(rows):, 0] = True  # padding rows pool one (ignored) token
            vectors = _compiled_embed(self.graphdef, pooling, self.state, ids_bt, valid_bt)
            out[rows] = np.asarray(vectors)[:len(rows)]
        return out


def _embed(graphdef, pooling: PoolingConfig, state, ids_bt, valid_bt):
    model = nnx.merge(graphdef, state)
    return pool(model.hidden_states(ids_bt, valid_bt), valid_bt, pooling)


# The graph definition and pooling are static; weights stay arguments.
_compiled_embed = jax.jit(_embed, static_argnums=(0, 1))
