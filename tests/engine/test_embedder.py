"""Decoder embeddings against HF transformers (a tiny random Llama, PyTorch
CPU), and the async embedder's batching across requests."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from checkpoints.loader import LoadedModel
from checkpoints.safetensors_dir import load_decoder
from engine.async_embedder import AsyncEmbedder
from engine.embedder import Embedder
from model.pooling import PoolingMode
from tests.hf_reference import save_tiny_model

LENGTHS = (1, 5, 17, 33, 9, 2, 30, 12, 40)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2):
    folder = tmp_path_factory.mktemp("tiny-embed")
    hf_model = save_tiny_model("llama", folder)
    config, model = load_decoder(folder)
    return hf_model, LoadedModel(path=folder, config=config, model=model, tokenizer=smollm2.tokenizer)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=n).tolist() for n in LENGTHS]


def _reference(hf_model, ids: list[int], mode: PoolingMode) -> np.ndarray:
    with torch.no_grad():
        hidden = hf_model.model(torch.tensor([ids])).last_hidden_state[0].numpy()
    vector = hidden[-1] if mode is PoolingMode.LAST else hidden.mean(axis=0)
    return vector / np.linalg.norm(vector)


@pytest.mark.parametrize("mode", [PoolingMode.LAST, PoolingMode.MEAN])
def test_decoder_embeddings_match_hf(tiny, inputs, mode):
    hf_model, loaded = tiny
    # Batches of 4 rows: several batches, padded rows and tokens in each.
    embedder = Embedder.for_decoder(loaded, pooling=mode, max_batch_size=4)
    ours = embedder.embed(inputs)
    reference = np.stack([_reference(hf_model, ids, mode) for ids in inputs])
    np.testing.assert_allclose(ours, reference, atol=2e-6, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)


def test_normalisation_can_be_turned_off(tiny, inputs):
    embedder = Embedder.for_decoder(tiny[1])
    raw = embedder.embed(inputs, normalize=False)
    unit = embedder.embed(inputs)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), unit, atol=1e-6)


def test_decoders_pool_the_last_token_or_the_mean_only(tiny):
    with pytest.raises(ValueError, match="last token or the mean"):
        Embedder.for_decoder(tiny[1], pooling=PoolingMode.CLS)


def test_bad_inputs_name_the_input(tiny):
    embedder = Embedder.for_decoder(tiny[1], max_length=64)
    for rows, message in [([[1], []], "input 1 is empty"), ([[1] * 65], "at most 64"),
                          ([[1, 10**6]], "token ids must be in")]:
        with pytest.raises(ValueError, match=message):
            embedder.embed(rows)


def test_concurrent_requests_share_batches(tiny, inputs):
    embedder = Embedder.for_decoder(tiny[1], max_batch_size=16)
    alone = [embedder.embed([ids])[0] for ids in inputs]
    calls = []
    real_embed = embedder.embed

    def counting_embed(rows, **kwargs):  # the real embed, counted
        calls.append(len(rows))
        return real_embed(rows, **kwargs)

    embedder.embed = counting_embed
    worker = AsyncEmbedder(embedder)

    async def run():
        return await asyncio.gather(*(worker.embed([ids]) for ids in inputs))

    try:
        results = asyncio.run(run())
    finally:
        worker.shutdown(timeout=10)
    # Each request gets its own vector, whatever batch it rode in.
    np.testing.assert_allclose(np.concatenate(results), np.stack(alone), atol=1e-6, rtol=0)
    assert sum(calls) == len(inputs) and len(calls) < len(inputs), calls


def test_a_cancelled_request_is_skipped_and_others_still_run(tiny, inputs):
    embedder = Embedder.for_decoder(tiny[1])
    worker = AsyncEmbedder(embedder)

    async def run():
        first = asyncio.ensure_future(worker.embed(inputs))
        gone = asyncio.ensure_future(worker.embed([inputs[0]]))
        await asyncio.sleep(0)
        gone.cancel()
        return await first, gone

    try:
        vectors, gone = asyncio.run(run())
    finally:
        worker.shutdown(timeout=10)
    assert gone.cancelled()
    np.testing.assert_allclose(vectors, embedder.embed(inputs), atol=1e-6, rtol=0)
    with pytest.raises(RuntimeError, match="stopped"):
        asyncio.run(worker.embed([inputs[0]]))
