"""GGUF files of every supported tensor type, written like llama.cpp's converter,
against HF transformers loading the same file: logits at every prefill position."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from checkpoints.gguf_file import load_decoder
from tests.forward import PagedForward
from model.kv_cache import KVCache
from tests.gguf_writer import Q, load_hf_from_gguf, tiny_llama, write_gguf, write_tiny_llama_gguf
from tests.hf_reference import hf_logits

TOLERANCE = 1e-4
PAGE_SIZE = 4
PROMPT = np.random.default_rng(1).integers(0, 256, size=11).tolist()

TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K]


@pytest.fixture(scope="module", autouse=True)
def _torch_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def _our_prefill_logits(model, prompt: list[int]) -> np.ndarray:
    runner = PagedForward(model)
    num_pages = -(-len(prompt) // PAGE_SIZE)
    kv = KVCache.zeros(runner.config, num_pages=num_pages + 2, page_size=PAGE_SIZE)
    # Pages out of order and offset, so the block table matters.
    block_table = jnp.asarray([list(range(num_pages + 1, 1, -1))], jnp.int32)
    logits, _ = runner.forward(jnp.asarray([prompt]), jnp.arange(len(prompt))[None], kv, block_table,
                               jnp.ones((1, len(prompt)), bool), all_positions=True)
    return np.asarray(logits[0])


def _check_against_hf(path, *, tied: bool):
    reference = hf_logits(load_hf_from_gguf(path), PROMPT)
    assert np.isfinite(reference).all() and reference.std() > 1e-2  # not a degenerate model
    cfg, model = load_decoder(path)
    assert cfg.tie_word_embeddings == tied
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 256, 4, 2, 64)
    ours = _our_prefill_logits(model, PROMPT)
    np.testing.assert_allclose(ours, reference, atol=TOLERANCE, rtol=0)
    return ours


@pytest.mark.parametrize("tensor_type", TYPES, ids=lambda t: t.name)
def test_prefill_logits_match_hf_on_same_gguf(tensor_type, tmp_path):
    path = write_tiny_llama_gguf(tmp_path / f"tiny-{tensor_type.name}.gguf", tensor_type=tensor_type)
    _check_against_hf(path, tied=False)


def test_tied_embeddings_q8_0(tmp_path):
    path = write_tiny_llama_gguf(tmp_path / "tiny-tied.gguf", tensor_type=Q.Q8_0, tie_word_embeddings=True)
    _check_against_hf(path, tied=True)


def test_mixed_types_per_tensor(tmp_path):
    """As in llama.cpp's Q4_K_M files: most matrices Q4_K, some Q6_K, embeddings Q8_0."""
    overrides = {"token_embd.weight": Q.Q8_0, "output.weight": Q.Q6_K,
                 "blk.0.attn_v.weight": Q.Q6_K, "blk.1.ffn_down.weight": Q.Q6_K,
                 "blk.1.attn_k.weight": Q.F16}
    path = write_tiny_llama_gguf(tmp_path / "tiny-mixed.gguf", tensor_type=Q.Q4_K, type_overrides=overrides)
    _check_against_hf(path, tied=False)


def test_f32_gguf_reproduces_the_source_model(tmp_path):
    """The writer itself: an F32 GGUF (Q/K permuted, then un-permuted on load) gives
    the logits of the HF model it was written from."""
    hf_model = tiny_llama(seed=3)
    state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    path = write_gguf(tmp_path / "tiny-f32.gguf", state, hf_model.config)
    ours = _check_against_hf(path, tied=False)
    np.testing.assert_allclose(ours, hf_logits(hf_model, PROMPT), atol=TOLERANCE, rtol=0)
