"""The on-device sampler: greedy, temperature, nucleus (top-p), seeded reproducibility."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from engine.sampling import SamplingParams, sample

PROBS = np.array([0.5, 0.3, 0.15, 0.05])


def _draw(logits_v, *, temperature, top_p, seeds, position=7):
    n = len(seeds)
    return np.asarray(sample(jnp.asarray(np.tile(logits_v, (n, 1)), jnp.float32),
                             jnp.full((n,), temperature, jnp.float32), jnp.full((n,), top_p, jnp.float32),
                             jnp.asarray(seeds, jnp.uint32), jnp.full((n,), position)))


def test_greedy_is_argmax():
    logits = np.random.default_rng(0).normal(size=(5, 100)).astype(np.float32)
    ids = sample(jnp.asarray(logits), jnp.zeros(5), jnp.ones(5), jnp.arange(5, dtype=jnp.uint32),
                 jnp.zeros(5, jnp.int32))
    np.testing.assert_array_equal(np.asarray(ids), logits.argmax(-1))


def test_temperature_one_follows_softmax():
    ids = _draw(np.log(PROBS), temperature=1.0, top_p=1.0, seeds=np.arange(4000))
    frequencies = np.bincount(ids, minlength=4) / len(ids)
    np.testing.assert_allclose(frequencies, PROBS, atol=0.03)


def test_top_p_keeps_the_smallest_sufficient_set():
    # Mass before token 2 is 0.8 ≥ 0.75, so only tokens 0 and 1 may be drawn.
    ids = _draw(np.log(PROBS), temperature=1.0, top_p=0.75, seeds=np.arange(2000))
    assert set(np.unique(ids)) == {0, 1}
    np.testing.assert_allclose(np.mean(ids == 0), 0.5 / 0.8, atol=0.04)
    # A tiny top_p keeps only the most likely token.
    assert set(_draw(np.log(PROBS), temperature=1.0, top_p=0.01, seeds=np.arange(200))) == {0}


def test_same_seed_and_position_same_token_whatever_the_batch():
    logits_v = np.random.default_rng(1).normal(size=1000).astype(np.float32)
    alone = _draw(logits_v, temperature=1.0, top_p=0.95, seeds=[42])
    in_batch = _draw(logits_v, temperature=1.0, top_p=0.95, seeds=[7, 42, 9, 13])
    assert alone[0] == in_batch[1]
    many = _draw(logits_v, temperature=1.0, top_p=0.95, seeds=np.arange(50))
    assert len(set(many)) > 10  # different seeds really differ


@pytest.mark.parametrize("kwargs", [{"max_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0},
                                    {"top_p": 1.5}])
def test_invalid_sampling_params(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
