"""Precision levels of the decoder against a float64 forward of the same
weights (HF transformers, PyTorch CPU, `.double()`), on a tiny random Llama.

The numerics issue's acceptance figures (SmolLM2, 3 prompts) come from
`python -m bench.numerics`; this test keeps the direction honest in CI."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from checkpoints.safetensors_dir import load_decoder
from model.numerics import Precision
from tests.hf_reference import save_tiny_model


@pytest.fixture(scope="module")
def errors(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-precision")
    hf_model = save_tiny_model("llama", folder, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2).double()
    _, model = load_decoder(folder)
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, static_argnums=(0,))
    def logits(precision, state, ids, valid):
        m = nnx.merge(graphdef, state)
        return m.logits(m.hidden_states(ids, valid, precision=precision), precision=precision)

    ids = np.random.default_rng(0).integers(0, 256, (1, 40)).astype(np.int32)
    with torch.no_grad():
        reference = hf_model(torch.tensor(ids)).logits[0].numpy()
    return {p: float(np.abs(np.asarray(logits(p, state, ids, np.ones_like(ids, bool)))[0] - reference).max())
            for p in Precision}


def test_ultra_is_closer_to_float64_than_plain_float32(errors):
    assert errors[Precision.ULTRA] * 2 <= errors[Precision.STANDARD], errors  # 3.0x measured


def test_high_is_no_worse_than_plain_float32(errors):
    assert errors[Precision.HIGH] <= 1.5 * errors[Precision.STANDARD], errors
