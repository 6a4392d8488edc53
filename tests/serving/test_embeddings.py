"""/v1/embeddings and /api/v1/embeddings through the official `openai` SDK,
against one live server that serves a chat model (the tiny random Llama)
and an embedding model (the real all-MiniLM-L6-v2). sentence-transformers
(PyTorch CPU) is the reference for MiniLM; our decoder embedder run
directly is the reference for the chat model (it is checked against HF in
tests/engine/test_embedder.py)."""

from __future__ import annotations

import argparse
import asyncio
import base64

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from checkpoints.encoder_dir import load_encoder
from engine.embedder import Embedder
from engine.llm_engine import LLMEngine
from serving import server as serve_cli
from serving.state import ModelSpec, ServeConfig, ServerState
from tests.serving.conftest import ENGINE_CONFIG, MODEL, LiveServer
from tests.serving.test_errors import error_of, sdk_error

MINILM = "minilm"
TEXTS = ["The cat sat on the mat.", "Stock markets fell sharply on Monday.", "", "日本語のテキスト"]
LONG_TEXT = "A long paragraph about nothing in particular. " * 40  # over MiniLM's 256 tokens


@pytest.fixture(scope="module")
def minilm(minilm_folder):
    return load_encoder(minilm_folder)


@pytest.fixture(scope="module")
def two_models(tiny_loaded, minilm):
    specs = [ModelSpec(MODEL, lambda startup: LLMEngine(tiny_loaded, ENGINE_CONFIG, startup=startup)),
             ModelSpec(MINILM, lambda startup: Embedder.for_encoder(minilm), is_encoder=True)]
    server = LiveServer(ServerState(ServeConfig(), specs)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(two_models):
    with openai.OpenAI(base_url=two_models.v1, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def sentence_transformers_vectors(minilm_folder):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_folder), device="cpu")
    return model.encode(TEXTS + [LONG_TEXT], convert_to_numpy=True)


def _vectors(response) -> np.ndarray:
    assert [d.index for d in response.data] == list(range(len(response.data)))
    return np.array([d.embedding for d in response.data], np.float32)


def test_models_lists_both(client):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {MODEL, MINILM}
    assert (cards[MODEL].max_model_len, cards[MINILM].max_model_len) == (ENGINE_CONFIG.max_model_len, 256)
    assert client.models.retrieve(MINILM).id == MINILM


def test_minilm_matches_sentence_transformers_in_both_encodings(client, sentence_transformers_vectors, minilm):
    as_float = client.embeddings.create(model=MINILM, input=TEXTS, encoding_format="float")
    as_base64 = client.embeddings.create(model=MINILM, input=TEXTS, encoding_format="base64")
    # Without encoding_format the SDK asks for base64 and decodes it itself.
    sdk_default = client.embeddings.create(model=MINILM, input=TEXTS)
    assert isinstance(as_float.data[0].embedding, list) and isinstance(as_base64.data[0].embedding, str)
    decoded = np.stack([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in as_base64.data])
    ours = _vectors(as_float)
    np.testing.assert_array_equal(decoded, ours)  # the very same floats
    np.testing.assert_array_equal(_vectors(sdk_default), ours)
    reference = sentence_transformers_vectors[:len(TEXTS)]
    assert np.abs(ours - reference).max() <= 1e-5
    cosine = np.sum(ours * reference, axis=1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() >= 0.99999
    num_tokens = sum(len(minilm.tokenizer.encode(t)) for t in TEXTS)
    assert (as_float.usage.prompt_tokens, as_float.usage.total_tokens) == (num_tokens, num_tokens)
    assert as_float.model == MINILM and as_float.object == "list"


def test_token_id_inputs_give_the_same_vectors(client, minilm):
    ids = [minilm.tokenizer.encode(t) for t in TEXTS[:2]]
    by_text = _vectors(client.embeddings.create(model=MINILM, input=TEXTS[:2], encoding_format="float"))
    by_ids = _vectors(client.embeddings.create(model=MINILM, input=ids, encoding_format="float"))
    single = _vectors(client.embeddings.create(model=MINILM, input=ids[0], encoding_format="float"))
    np.testing.assert_allclose(by_ids, by_text, atol=1e-6, rtol=0)
    np.testing.assert_allclose(single[0], by_text[0], atol=1e-6, rtol=0)


def test_chat_model_embeds_too_and_still_chats(client, tiny_loaded):
    response = client.embeddings.create(model=MODEL, input=TEXTS[:2], encoding_format="float")
    expected = Embedder.for_decoder(tiny_loaded).embed([tiny_loaded.tokenizer.encode(t) for t in TEXTS[:2]])
    np.testing.assert_allclose(_vectors(response), expected, atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(_vectors(response), axis=1), 1.0, atol=1e-6)
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=3)
    assert reply.model == MODEL and reply.usage.completion_tokens >= 1


def test_over_long_input_is_400_unless_truncation_is_asked(client, sentence_transformers_vectors):
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=MINILM, input=LONG_TEXT)
    error = sdk_error(info, status=400, code="context_length_exceeded", param="input")
    assert "256" in error["message"]
    cut = client.embeddings.create(model=MINILM, input=LONG_TEXT, encoding_format="float",
                                   extra_body={"truncate_prompt_tokens": -1})
    assert cut.usage.prompt_tokens == 256
    # sentence-transformers cuts at 256 tokens too.
    assert np.abs(_vectors(cut)[0] - sentence_transformers_vectors[-1]).max() <= 1e-5


@pytest.mark.parametrize("kwargs, code, param", [
    ({"model": MINILM, "input": "a", "dimensions": 128}, "invalid_value", "dimensions"),
    ({"model": MINILM, "input": []}, "invalid_value", "input"),
    ({"model": MINILM, "input": ["a"] * 2049}, "invalid_value", "input"),
    ({"model": MINILM, "input": [[1, 10**9]]}, "invalid_value", "input"),
    ({"model": MINILM, "input": "a", "encoding_format": "int8"}, "invalid_value", "encoding_format"),
])
def test_bad_embeddings_requests_are_400(client, kwargs, code, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(**kwargs)
    sdk_error(info, status=400, code=code, param=param)


def test_the_models_own_dimensions_are_accepted(client):
    response = client.embeddings.create(model=MINILM, input="a", dimensions=384, encoding_format="float")
    assert len(response.data[0].embedding) == 384


def test_routing_errors(client, two_models):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model=MINILM, messages=[{"role": "user", "content": "Hi"}])
    sdk_error(info, status=404, code="model_not_supported", param="model")
    with pytest.raises(openai.NotFoundError) as info:
        client.embeddings.create(model="no-such-model", input="a")
    sdk_error(info, status=404, code="model_not_found", param="model")
    # Without a model, embeddings go to the embedding model, chat to the chat model.
    response = httpx.post(two_models.v1 + "/embeddings", json={"input": "a"}, timeout=60)
    assert (response.status_code, response.json()["model"]) == (200, MINILM)
    response = httpx.post(two_models.v1 + "/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert (response.status_code, response.json()["model"]) == (200, MODEL)


def test_concurrent_requests_get_their_own_vectors(two_models, client):
    texts = [f"Sentence number {i} is about {'cats' if i % 2 else 'markets'}." for i in range(16)]
    alone = _vectors(client.embeddings.create(model=MINILM, input=texts, encoding_format="float"))

    async def run():
        async with openai.AsyncOpenAI(base_url=two_models.v1, api_key="unused", max_retries=0) as aclient:
            return await asyncio.gather(*(aclient.embeddings.create(model=MINILM, input=t) for t in texts))

    together = np.concatenate([_vectors(r) for r in asyncio.run(run())])
    np.testing.assert_allclose(together, alone, atol=1e-6, rtol=0)


def test_full_embedding_queue_is_429(client, two_models):
    model = two_models.state.models[MINILM]
    held = [model.admit(1) for _ in range(1 + two_models.state.config.max_queue)]
    try:
        with pytest.raises(openai.RateLimitError) as info:
            client.embeddings.create(model=MINILM, input="a")
        sdk_error(info, status=429, code="rate_limit_exceeded", kind="rate_limit_error")
    finally:
        for admission in held:
            admission.release()
    assert client.embeddings.create(model=MINILM, input="a").data


def test_seed_embeddings_with_and_without_normalisation(client, two_models):
    url = two_models.url + "/api/v1/embeddings"
    normalised = httpx.post(url, json={"input": TEXTS[:2], "model": MINILM}, timeout=60).json()
    raw = httpx.post(url, json={"input": TEXTS[:2], "model": MINILM, "act_normalization": False},
                     timeout=60).json()
    assert (normalised["model"], normalised["dimensions"]) == (MINILM, 384)
    unit, plain = np.array(normalised["embeddings"]), np.array(raw["embeddings"])
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-6)
    assert np.abs(np.linalg.norm(plain, axis=1) - 1.0).min() > 0.01  # MiniLM's mean-pooled norms are not 1
    np.testing.assert_allclose(plain / np.linalg.norm(plain, axis=1, keepdims=True), unit, atol=1e-6)
    openai_vectors = _vectors(client.embeddings.create(model=MINILM, input=TEXTS[:2], encoding_format="float"))
    np.testing.assert_allclose(unit, openai_vectors, atol=1e-6)
    assert normalised["tokens"] > 0 and normalised["inference_time"] >= 0

    error_of(httpx.post(url, json={"input": LONG_TEXT, "model": MINILM}, timeout=60), status=400,
             code="context_length_exceeded", param="input")
    assert httpx.post(url, json={"input": LONG_TEXT, "model": MINILM, "truncate": True},
                      timeout=60).json()["tokens"] == 256
    error_of(httpx.post(url, json={"input": "a", "act_precision": "ultra"}, timeout=60), status=400,
             code="unsupported_parameter", param="act_precision")
    models = httpx.get(two_models.url + "/models", timeout=60).json()["models"]
    assert {m["name"]: m["type"] for m in models} == {MODEL: "chat", MINILM: "embedding"}


def test_embedding_metrics(client, two_models):
    def inputs_counted() -> float:
        text = httpx.get(two_models.url + "/metrics", timeout=60).text
        family = {f.name: f for f in text_string_to_metric_families(text)}["balansis:embedding_inputs"]
        return sum(s.value for s in family.samples
                   if s.name.endswith("_total") and s.labels == {"model_name": MINILM})

    before = inputs_counted()
    client.embeddings.create(model=MINILM, input=TEXTS[:3])
    assert inputs_counted() == before + 3


def test_tokenize_on_the_embedding_model(two_models, minilm):
    response = httpx.post(two_models.url + "/tokenize", json={"model": MINILM, "prompt": "Hello world"},
                          timeout=60)
    assert response.json() == {"count": 4, "max_model_len": 256, "tokens": minilm.tokenizer.encode("Hello world")}


def _serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_serve_flags_name_each_model(tiny_loaded, minilm_folder):
    chat = str(tiny_loaded.path)
    specs = serve_cli.model_specs(_serve_args("--model", chat, "--model", str(minilm_folder),
                                              "--served-model-name", "chat", "--served-model-name", "mini",
                                              "--embedding-pooling", "mean"))
    assert [(s.name, s.is_encoder) for s in specs] == [("chat", False), ("mini", True)]
    assert specs[0].embedding_pooling.value == "mean"
    # Names default to the folder names.
    specs = serve_cli.model_specs(_serve_args("--model", chat, "--model", str(minilm_folder)))
    assert [s.name for s in specs] == [tiny_loaded.path.name, "model"]
    with pytest.raises(ValueError, match="once per --model"):
        serve_cli.model_specs(_serve_args("--model", chat, "--model", str(minilm_folder),
                                          "--served-model-name", "x"))
    with pytest.raises(ValueError, match="must differ"):
        serve_cli.model_specs(_serve_args("--model", chat, "--model", chat))
