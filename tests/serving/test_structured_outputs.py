"""Structured outputs through the official `openai` SDK on a live server (the tiny random model:
whatever it would write, the constraint decides what it may): response_format json_object and
json_schema, the SDK's parse() with a Pydantic model, vLLM's structured_outputs (regex, choice,
grammar, json) on chat and completions, streamed too."""

from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema
import openai
import pydantic
import pytest

from tests.serving.conftest import MODEL

MESSAGES = [{"role": "user", "content": "Answer in JSON."}]

SCHEMAS = {
    "flat": {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": -5,
                                                                                 "maximum": 5}},
             "required": ["ok", "n"], "additionalProperties": False},
    "nested with an array": {"type": "object", "properties": {
        "items": {"type": "array", "minItems": 1, "maxItems": 3,
                  "items": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                                                             "tag": {"enum": ["a", "b"]}},
                            "required": ["id", "tag"], "additionalProperties": False}}},
        "required": ["items"], "additionalProperties": False},
    "$ref and anyOf": {"$defs": {"color": {"enum": ["red", "green"]}}, "type": "object", "properties": {
        "color": {"$ref": "#/$defs/color"}, "size": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 9},
                                                               {"const": "big"}]}},
        "required": ["color", "size"], "additionalProperties": False},
    "a patterned string": {"type": "object",
                           "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"}},
                           "required": ["code"], "additionalProperties": False},
}


@pytest.fixture(scope="module")
def client(live_server):
    with openai.OpenAI(base_url=live_server.v1, api_key="unused", max_retries=0) as client:
        yield client


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_output_validates(client, name):
    schema = SCHEMAS[name]
    for seed in (1, 2):
        reply = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=120, temperature=1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}})
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_streamed_is_the_same_object(client):
    body = dict(model=MODEL, messages=MESSAGES, max_tokens=60, temperature=0,
                response_format={"type": "json_object"})
    whole = client.chat.completions.create(**body).choices[0]
    pieces = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        **body, stream=True) if chunk.choices)
    assert pieces == whole.message.content
    if whole.finish_reason == "stop":
        assert isinstance(json.loads(whole.message.content), dict)


class Pet(pydantic.BaseModel):
    kind: Literal["cat", "dog", "fish"]
    legs: int = pydantic.Field(ge=0, le=4)
    vaccinated: bool


def test_the_sdk_s_parse_returns_the_pydantic_object(client):
    completion = client.chat.completions.parse(model=MODEL, messages=MESSAGES, max_tokens=60, temperature=1.0,
                                               seed=3, response_format=Pet)
    pet = completion.choices[0].message.parsed
    assert isinstance(pet, Pet) and pet.kind in ("cat", "dog", "fish") and 0 <= pet.legs <= 4


def test_structured_outputs_regex_choice_and_grammar(client):
    def chat(constraint, **extra):
        return client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40, temperature=1.0,
                                              extra_body={"structured_outputs": constraint}, **extra)
    for seed in (1, 2, 3):
        assert re.fullmatch(r"\d{3}-[a-z]{3}", chat({"regex": r"\d{3}-[a-z]{3}"}, seed=seed)
                            .choices[0].message.content)
        assert chat({"choice": ["left", "right"]}, seed=seed).choices[0].message.content in ("left", "right")
        text = chat({"grammar": 'start: "x=" /[0-9]{1,2}/ ";"'}, seed=seed).choices[0].message.content
        assert re.fullmatch(r"x=[0-9]{1,2};", text), text
    reply = chat({"json": SCHEMAS["flat"]}, seed=4, n=3)
    for choice in reply.choices:
        jsonschema.validate(json.loads(choice.message.content), SCHEMAS["flat"])


def test_completions_take_structured_outputs(client):
    reply = client.completions.create(model=MODEL, prompt="The answer is", max_tokens=20, temperature=1.0, seed=5,
                                      extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe"]}})
    assert reply.choices[0].text in ("yes", "no", "maybe")


def test_a_schema_the_library_rejects_is_a_clear_400(client):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "dependentSchemas": {"a": {}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    error = info.value.body
    assert error["param"] == "response_format" and "dependentSchemas" in error["message"]


def test_logprobs_are_the_constrained_distribution_s(client):
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=10,
                                           extra_body={"structured_outputs": {"choice": ["left", "right"]}})
    first = reply.choices[0].logprobs.content[0]
    possible = [alt.logprob for alt in first.top_logprobs if alt.logprob > -9999.0]
    assert abs(sum(2.718281828 ** lp for lp in possible) - 1) < 1e-3  # the allowed tokens hold all the mass
    assert all(alt.logprob == -9999.0 for alt in first.top_logprobs[len(possible):])  # JSON has no -inf
