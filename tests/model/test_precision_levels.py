"""Precision levels of the decoder against a float64 forward of the same
weights (HF transformers, PyTorch CPU, float64 throughout), on a tiny random Llama,
and their batch invariance.

The numerics issue's acceptance figures (SmolLM2, 3 prompts) come from
`python -m bench.numerics`; these tests keep the direction honest in CI."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from checkpoints.safetensors_dir import load_decoder
from model.numerics import Precision
from tests.forward import logits_function
from tests.hf_reference import float64_reference, save_tiny_model

SHAPE = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2)


def _errors(folder, hf_model) -> dict[Precision, float]:
    _, model = load_decoder(folder)
    logits = logits_function(model)
    ids = np.random.default_rng(0).integers(0, 256, (1, 40)).astype(np.int32)
    with torch.no_grad():
        reference = float64_reference(hf_model)(torch.tensor(ids)).logits[0].numpy()
    return {p: float(np.abs(logits(ids, precision=p)[0] - reference).max()) for p in Precision}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-precision")
    return folder, save_tiny_model("llama", folder, **SHAPE)


def test_ultra_is_closer_to_float64_than_plain_float32(tiny):
    errors = _errors(*tiny)
    print({p.value: f"{e:.3g}" for p, e in errors.items()})
    assert errors[Precision.ULTRA] * 5 <= errors[Precision.STANDARD], errors


def test_high_is_no_worse_than_plain_float32_at_bfloat16_weights(tmp_path):
    hf_model = save_tiny_model("llama", tmp_path / "f32", **SHAPE)
    with torch.no_grad():
        for p in hf_model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    hf_model.save_pretrained(tmp_path / "bf16", safe_serialization=True)
    errors = _errors(tmp_path / "bf16", hf_model)
    print({p.value: f"{e:.3g}" for p, e in errors.items()})
    assert errors[Precision.HIGH] <= errors[Precision.STANDARD], errors


@pytest.mark.parametrize("precision", list(Precision))
def test_a_row_gives_the_same_bits_in_any_batch(tiny, precision):
    """A needle prompt alone, then at random rows of padded batches of 8 and 32 random prompts:
    bitwise the same logits under HIGH and ULTRA. STANDARD is the control: reported, not required."""
    _, model = load_decoder(tiny[0])
    logits = logits_function(model)
    rng = np.random.default_rng(1)
    needle = rng.integers(0, 256, 13).astype(np.int32)
    alone = logits(needle[None], precision=precision)[0]
    differences = []
    for rows, tokens in ((8, 16), (32, 64)):
        ids = rng.integers(0, 256, (rows, tokens)).astype(np.int32)
        valid = np.arange(tokens)[None, :] < rng.integers(1, tokens + 1, (rows, 1))
        row = int(rng.integers(rows))
        ids[row], valid[row] = 0, False
        ids[row, :13], valid[row, :13] = needle, True
        batched = logits(ids, valid, precision)[row, :13]
        differences.append(float(np.abs(batched - alone).max()))
        if precision is not Precision.STANDARD:
            assert batched.tobytes() == alone.tobytes(), (rows, tokens, differences)
    print(f"{precision.value}: largest difference from alone {max(differences):.3g}")


@pytest.mark.parametrize("integer_dots", [False, True], ids=["float32-dots", "int8-dots"])
@pytest.mark.parametrize("precision", [Precision.HIGH, Precision.ULTRA])
def test_weights_sliced_once_give_the_bits_of_weights_sliced_per_call(tiny, precision, integer_dots):
    """The engine cuts HIGH's and ULTRA's weights once (`slice_weights`); a paged forward with them
    (their dots in float32 or int8) gives the same logits, bit for bit, as cutting them in the call."""
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from model.kv_cache import KVCache

    _, model = load_decoder(tiny[0])
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, static_argnums=(0,))
    def forward(with_slices, state, ids, kv):
        m = nnx.merge(graphdef, state)
        sliced = m.slice_weights(integer_dots=integer_dots) if with_slices else None
        b, t = ids.shape
        hidden, _ = m(ids, jnp.broadcast_to(jnp.arange(t), (b, t)), kv, jnp.arange(4, dtype=jnp.int32)[None],
                      jnp.ones((b, t), bool), precision=precision, sliced=sliced)
        return m.logits(hidden, precision=precision, sliced=sliced)

    ids = jnp.asarray(np.random.default_rng(5).integers(0, 256, (1, 24)), jnp.int32)
    kv = KVCache.zeros(model.config, num_pages=4, page_size=16)
    per_call = np.asarray(forward(False, state, ids, kv))
    once = np.asarray(forward(True, state, ids, KVCache.zeros(model.config, num_pages=4, page_size=16)))
    assert once.tobytes() == per_call.tobytes()
