"""OpenAI embeddings bodies and responses, on the real all-MiniLM-L6-v2 embedder."""

from __future__ import annotations

import base64

import numpy as np
import pytest

import msgspec

from serving import schemas
from serving.errors import RequestError, decode_body
from serving.openai_embeddings import check_dimensions, embeddings_response, input_token_ids
from serving.openai_embeddings import parse_embeddings_request as _parse_struct


def parse_embeddings_request(body):
    """A JSON body decoded as the server and run-batch decode it, then checked."""
    return _parse_struct(decode_body(body, schemas.EmbeddingsRequest))


@pytest.fixture(scope="module")
def embedder(minilm_folder):
    from checkpoints.encoder_dir import load_encoder
    from engine.embedder import Embedder

    return Embedder.for_encoder(load_encoder(minilm_folder))


@pytest.mark.parametrize("value, expected", [
    ("one", ("one",)), (["a", "b"], ("a", "b")), ([101, 7592, 102], ((101, 7592, 102),)),
    ([[101, 102], [101, 7592, 102]], ((101, 102), (101, 7592, 102)))])
def test_the_four_input_forms(value, expected):
    assert parse_embeddings_request({"input": value, "model": "m"}).inputs == expected


@pytest.mark.parametrize("body, param", [
    ({}, "input"), ({"input": []}, "input"), ({"input": ["a", 1]}, "input"), ({"input": [[1], "a"]}, "input"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "a", "dimensions": 0}, "dimensions"),
    ({"input": "a", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"), ({"input": "a", "foo": 1}, "foo")])
def test_bad_bodies_name_the_parameter(body, param):
    with pytest.raises(RequestError) as info:
        parse_embeddings_request(body)
    assert info.value.param == param and info.value.status_code == 400


def test_float_and_base64_responses_carry_the_same_vectors(embedder):
    texts = ["The cat sat on the mat.", "Stock markets fell."]
    vectors = {}
    for encoding in ("float", "base64"):
        request = parse_embeddings_request({"input": texts, "encoding_format": encoding})
        ids = input_token_ids(request, embedder)
        body = msgspec.to_builtins(embeddings_response(embedder.embed(ids), request=request, model="minilm",
                                                       num_prompt_tokens=sum(map(len, ids))))
        assert [d["index"] for d in body["data"]] == [0, 1]
        assert body["usage"] == {"prompt_tokens": sum(map(len, ids)), "total_tokens": sum(map(len, ids))}
        raw = [d["embedding"] for d in body["data"]]
        # base64 is what the OpenAI SDK decodes: little-endian float32.
        vectors[encoding] = np.array([np.frombuffer(base64.b64decode(r), dtype="<f4") for r in raw]
                                     if encoding == "base64" else raw, np.float32)
    np.testing.assert_array_equal(vectors["float"], vectors["base64"])
    np.testing.assert_array_equal(vectors["float"], embedder.embed(embedder.encode(texts)))


def test_long_inputs_are_refused_unless_truncation_is_asked_for(embedder):
    long = "word " * 400
    with pytest.raises(RequestError) as info:
        input_token_ids(parse_embeddings_request({"input": long}), embedder)
    assert info.value.code == "context_length_exceeded"
    cut = input_token_ids(parse_embeddings_request({"input": long, "truncate_prompt_tokens": -1}), embedder)
    assert len(cut[0]) == 256
    assert len(input_token_ids(parse_embeddings_request({"input": long, "truncate_prompt_tokens": 10}),
                               embedder)[0]) == 10


def test_dimensions_other_than_the_models_are_refused():
    check_dimensions(parse_embeddings_request({"input": "a", "dimensions": 384}), 384)
    with pytest.raises(RequestError) as info:
        check_dimensions(parse_embeddings_request({"input": "a", "dimensions": 128}), 384)
    assert info.value.param == "dimensions"
