"""int8 weights (model.quantization): the quantiser's bound, both matmuls against the float
product of the same integers, and a quantised decoder at every precision level against a float
decoder holding the dequantised weights (what "computes with its own weights" means)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from checkpoints.safetensors_dir import load_decoder
from model import quantization as q8
from model.llama import MATRICES, SCALE_SUFFIX
from model.numerics import Precision
from model.quantization import Int8Weight, Quantization
from tests.forward import logits_function
from tests.hf_reference import save_tiny_model

SHAPE = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def _weight(rng, k=96, n=40) -> tuple[np.ndarray, Int8Weight]:
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero channel
    w[5, 7] = 40.0  # an outlier sets its column's scale
    ints, scale = q8.quantize(jnp.asarray(w))
    return w, Int8Weight(ints, scale)


def test_quantize_is_within_half_a_step_of_each_weight():
    w, quantized = _weight(np.random.default_rng(0))
    ints, scale = np.asarray(quantized.ints), np.asarray(quantized.scale)
    assert ints.dtype == np.int8 and np.abs(ints.astype(int)).max() <= 127
    assert np.abs(ints[:, 7]).max() == 127  # the largest weight of a column is ±127 steps
    error = np.abs(np.asarray(q8.dequantize(quantized)) - w)
    assert (error <= scale / 2 * (1 + 1e-6)).all()
    assert (np.asarray(q8.dequantize(quantized))[:, 3] == 0).all()


def test_weight_only_matmul_is_the_float_product_of_the_integers():
    rng = np.random.default_rng(1)
    _, w = _weight(rng)
    x = jnp.asarray(rng.standard_normal((3, 96)), jnp.float32)
    expected = np.asarray(x, np.float64) @ np.asarray(q8.dequantize(w), np.float64)
    got = np.asarray(q8.matmul(x, w, dynamic=False))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 4, 64])
def test_dynamic_matmul_is_within_the_activation_rounding(rows):
    """Rounding each row of x to int8 steps of r = max|x| / 127 moves each product by at most
    r/2 · Σ_k |w_k|; the integer dot itself is exact."""
    rng = np.random.default_rng(2)
    _, w = _weight(rng)
    x = rng.standard_normal((rows, 96)).astype(np.float32)
    got = np.asarray(q8.matmul(jnp.asarray(x), w, dynamic=True))
    dequantized = np.asarray(q8.dequantize(w), np.float64)
    error = np.abs(got - x.astype(np.float64) @ dequantized)
    bound = (np.abs(x).max(axis=1, keepdims=True) / 127 / 2) @ np.abs(dequantized).sum(axis=0, keepdims=True)
    assert (error <= bound * (1 + 1e-5) + 1e-5).all()
    assert error.max() > 0  # the activations were quantised


def test_dynamic_matmul_gives_a_row_the_same_bits_alone_and_in_a_batch():
    rng = np.random.default_rng(3)
    _, w = _weight(rng)
    x = jnp.asarray(rng.standard_normal((8, 96)), jnp.float32)
    batched = np.asarray(q8.matmul(x, w, dynamic=True))
    for row in (0, 5):
        alone = np.asarray(q8.matmul(x[row:row + 1], w, dynamic=True))  # padded to four rows
        assert alone.tobytes() == batched[row:row + 1].tobytes()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny decoder quantised, and a float decoder holding exactly its dequantised weights."""
    folder = tmp_path_factory.mktemp("tiny-int8")
    save_tiny_model("llama", folder, **SHAPE)
    _, model = load_decoder(folder)
    quantized = model.quantized(Quantization.INT8)
    _, dequantized = load_decoder(folder)
    for name in MATRICES:
        ints, scale = getattr(quantized.layers, name)[...], getattr(quantized.layers, name + SCALE_SUFFIX)[...]
        getattr(dequantized.layers, name).set_value(q8.dequantize(Int8Weight(ints, scale)))
    embed = quantized.embed_tokens[...].astype(jnp.float32) * quantized.embed_tokens_scale[...][:, None]
    dequantized.embed_tokens.set_value(embed)
    if not model.config.tie_word_embeddings:
        head = Int8Weight(quantized.lm_head[...], quantized.lm_head_scale[...])
        dequantized.lm_head.set_value(q8.dequantize(head))
    return model, quantized, dequantized


def test_the_quantised_model_holds_a_quarter_of_the_bytes(models):
    model, quantized, _ = models
    leaves = jax.tree.leaves(nnx.state(quantized))
    assert {str(a.dtype) for a in leaves} == {"int8", "float32"}
    float_bytes = sum(a.nbytes for a in jax.tree.leaves(nnx.state(model)))
    assert sum(a.nbytes for a in leaves) < 0.27 * float_bytes


@pytest.mark.parametrize("precision", list(Precision))
def test_every_level_computes_with_the_quantised_weights(models, precision):
    """HIGH and ULTRA on the int8 model give the float model of its dequantised weights (up to
    q · s rounding to float32 there); STANDARD quantises the LM head's activations, so it is
    held to a looser bound."""
    _, quantized, dequantized = models
    ids = np.random.default_rng(4).integers(0, 256, (2, 24)).astype(np.int32)
    got = logits_function(quantized)(ids, precision=precision)
    expected = logits_function(dequantized)(ids, precision=Precision.HIGH if precision is Precision.STANDARD
                                            else precision)
    error = float(np.abs(got - expected).max())
    print(f"{precision.value}: largest logit difference from the dequantised float model {error:.3g}")
    assert error <= (0.05 if precision is Precision.STANDARD else 1e-4) * float(np.abs(expected).max())


@pytest.mark.parametrize("precision", [Precision.HIGH, Precision.ULTRA])
def test_high_and_ultra_stay_batch_invariant_on_int8_weights(models, precision):
    _, quantized, _ = models
    logits = logits_function(quantized)
    rng = np.random.default_rng(5)
    needle = rng.integers(0, 256, 11).astype(np.int32)
    alone = logits(needle[None], precision=precision)[0]
    ids = rng.integers(0, 256, (6, 20)).astype(np.int32)
    valid = np.arange(20)[None, :] < rng.integers(1, 21, (6, 1))
    ids[2], valid[2] = 0, False
    ids[2, :11], valid[2, :11] = needle, True
    assert logits(ids, valid, precision)[2, :11].tobytes() == alone.tobytes()


def test_int8_dynamic_quantises_the_layers_activations_from_32_rows(models, tmp_path):
    """The same integers as int8; from 32 rows its layers' matmuls go int8 × int8, below they
    are int8's own."""
    model, quantized, _ = models
    dynamic = model.quantized(Quantization.INT8_DYNAMIC)
    assert (dynamic.layers.q_proj[...] == quantized.layers.q_proj[...]).all()
    rng = np.random.default_rng(6)
    few, many = (rng.integers(0, 256, (1, t)).astype(np.int32) for t in (8, 40))
    same = logits_function(dynamic)(few), logits_function(quantized)(few)
    assert same[0].tobytes() == same[1].tobytes()
    apart = logits_function(dynamic)(many), logits_function(quantized)(many)
    assert apart[0].tobytes() != apart[1].tobytes()
    assert float(np.abs(apart[0] - apart[1]).max()) <= 0.1 * float(np.abs(apart[1]).max())


def test_quantising_twice_is_refused(models):
    _, quantized, _ = models
    assert quantized.quantized(Quantization.INT8) is quantized
    with pytest.raises(ValueError, match="already quantised"):
        quantized.quantized(Quantization.NONE)
