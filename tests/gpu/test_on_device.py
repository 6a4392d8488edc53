"""What only a GPU can show, run by `bench/gpu_check.sh` (`pytest -m gpu`); skipped without one.

The CPU suite runs the same kernels in Pallas interpret mode and the numerics
under XLA:CPU; here they are compiled for the device: the Pallas paged-attention
kernel through Triton, the fused prefill through cuDNN, and HIGH and ULTRA under
XLA:GPU, whose TF32 matmuls and excess-precision rewrites are what could break
their exactness.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import attention
from model.attention import AttentionBackend
from model.numerics import Precision
from tests.model import test_attention, test_numerics, test_precision_levels

pytestmark = pytest.mark.gpu

# Both sides compute in float32 on the device, where XLA's default dot precision and
# Triton's may use TF32 (10-bit significands): about 2**-10 relative.
DEVICE_TOLERANCE = 2e-3


@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_kernel_on_the_device_matches_the_gather_path(group, dtype):
    rng = np.random.default_rng(group)
    k, v = test_attention._cache(rng, dtype)
    for batch, width in [(1, 1), (4, 2), (8, 8), (64, 32)]:
        tables = test_attention._tables(rng, batch, width)
        positions = rng.integers(0, width * test_attention.PAGE_SIZE, (batch, 1))
        positions[0] = 0
        q = rng.standard_normal((batch, 1, test_attention.NUM_KV_HEADS * group, test_attention.HEAD_DIM))
        q = q.astype(np.float32)
        kernel = test_attention._attend(AttentionBackend.PALLAS, q, k, v, tables, positions)
        reference = test_attention._attend(AttentionBackend.XLA, q, k, v, tables, positions)
        scale = DEVICE_TOLERANCE if dtype == jnp.float32 else 0.05
        np.testing.assert_allclose(kernel, reference, atol=scale, rtol=0)


def test_a_decoded_row_has_the_same_bits_in_any_batch_on_the_device():
    test_attention.test_a_decoded_row_has_the_same_bits_in_any_batch()


def _compiled_text(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


def test_the_decode_kernel_is_compiled_not_interpreted():
    rng = np.random.default_rng(0)
    k, v = test_attention._cache(rng, jnp.bfloat16)
    q = jnp.asarray(rng.standard_normal((4, test_attention.NUM_KV_HEADS * 4, test_attention.HEAD_DIM)), jnp.float32)
    tables = jnp.asarray(test_attention._tables(rng, 4, 16))
    text = _compiled_text(lambda q, k, v, t: attention.paged_decode(q, k[0], v[0], t, jnp.full((4,), 200, jnp.int32)),
                          q, k, v, tables)
    assert "triton" in text.lower()


def test_the_fused_prefill_runs_cudnn_in_bfloat16():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((2, 128, 8, 64)), jnp.bfloat16)
    keys = jnp.asarray(rng.standard_normal((2, 2, 256, 64)), jnp.bfloat16)
    visible = jnp.asarray(np.arange(256)[None, None, :] <= np.arange(100, 228)[None, :, None]).repeat(2, 0)
    text = _compiled_text(attention.fused_dense, q, keys, keys, visible)
    assert "cudnn" in text.lower()


def test_error_free_transformations_on_the_device():
    test_numerics.test_error_free_transformations_inside_fused_jitted_code()
    test_numerics.test_compensated_sum_survives_heavy_cancellation_in_jitted_code()
    test_numerics.test_compensated_dot_keeps_every_product()
    test_numerics.test_double_word_exp_and_silu_in_jitted_code()


@pytest.mark.parametrize("precision", [Precision.HIGH, Precision.ULTRA])
def test_compensated_reductions_are_batch_invariant_on_the_device(precision):
    test_numerics.test_compensated_reductions_do_not_depend_on_padding_or_batch(precision)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.hf_reference import save_tiny_model

    folder = tmp_path_factory.mktemp("tiny-gpu")
    return folder, save_tiny_model("llama", folder, **test_precision_levels.SHAPE)


def test_ultra_is_closer_to_float64_than_plain_float32_on_the_device(tiny):
    test_precision_levels.test_ultra_is_closer_to_float64_than_plain_float32(tiny)


@pytest.mark.parametrize("precision", [Precision.HIGH, Precision.ULTRA])
def test_a_row_gives_the_same_bits_in_any_batch_on_the_device(tiny, precision):
    test_precision_levels.test_a_row_gives_the_same_bits_in_any_batch(tiny, precision)


@pytest.fixture(scope="module")
def engine_model(tmp_path_factory):
    """A tiny random Llama with a real tokenizer: the default model's, or (on a GPU host without
    the default model's package) the folder BALANSIS_TOKENIZER names (bench/gpu_check.sh prepares it)."""
    from checkpoints.loader import LoadedModel
    from checkpoints.safetensors_dir import load_decoder
    from checkpoints.tokenizer import Tokenizer
    from tests.hf_reference import save_tiny_model

    folder = tmp_path_factory.mktemp("tiny-256")
    save_tiny_model("llama", folder, num_hidden_layers=1, max_position_embeddings=256)
    if os.environ.get("BALANSIS_TOKENIZER"):
        tokenizer = Tokenizer.from_folder(Path(os.environ["BALANSIS_TOKENIZER"]))
    else:
        from checkpoints.loader import load_model

        tokenizer = load_model().tokenizer
    config, model = load_decoder(folder)
    return LoadedModel(path=folder, config=config, model=model, tokenizer=tokenizer)


@pytest.mark.parametrize("precision", [Precision.HIGH, Precision.ULTRA])
def test_engine_needle_is_the_same_bits_in_any_batch_on_the_device(engine_model, precision):
    from tests.engine import test_precision_invariance

    test_precision_invariance.test_needle_logprobs_are_the_same_bits_in_any_batch(engine_model, precision)


def test_the_integer_sliced_matmul_is_an_integer_gemm_on_the_device():
    """HIGH's slices multiply as int8 × int8 → int32 in the compiled program (cuBLAS's integer GEMM
    or XLA's own dot on s8 operands), with the bits of the float32 dots."""
    from model import numerics
    from tests.model import test_sliced_matmul

    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((16, 576)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((576, 1536)) * 0.02, jnp.bfloat16)
    sliced = numerics.slice_weight(w, integer_dots=True)
    text = _compiled_text(lambda x, s: numerics.exact_matmul(x, s, precision=Precision.HIGH), x, sliced)
    assert "s8[" in text and "s32[" in text
    for k in (576, 1536):
        for precision in (Precision.HIGH, Precision.ULTRA):
            test_sliced_matmul.test_integer_dots_give_the_float32_dots_bits(precision, jnp.bfloat16, k)


def test_int8_weights_on_the_device():
    """`--quantization int8-dynamic`'s matmul is an int8 × int8 → int32 dot in the compiled program,
    within its activation-rounding bound; the quantised tiny model stays batch-invariant at HIGH."""
    from model import quantization as q8
    from tests.model import test_quantization

    rng = np.random.default_rng(3)
    w = q8.Int8Weight(*q8.quantize(jnp.asarray(rng.standard_normal((576, 1536)) * 0.02, jnp.float32)))
    x = jnp.asarray(rng.standard_normal((64, 576)), jnp.float32)
    text = _compiled_text(lambda x, w: q8.matmul(x, w, dynamic=True), x, w)
    assert "s8[" in text and "s32[" in text
    for rows in (1, 4, 64):
        test_quantization.test_dynamic_matmul_is_within_the_activation_rounding(rows)
    test_quantization.test_dynamic_matmul_gives_a_row_the_same_bits_alone_and_in_a_batch()
