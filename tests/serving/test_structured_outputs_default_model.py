"""Structured outputs on the default model (SmolLM2-135M-Instruct) through the `openai` SDK: 20
JSON schemas, each sampled at temperature 1 with several seeds, every output parses and validates
(formats checked too); regex and choice constraints hold."""

from __future__ import annotations

import concurrent.futures
import json
import re

import jsonschema
import openai
import pytest

from engine.llm_engine import EngineConfig, LLMEngine
from serving.state import ModelSpec, ServeConfig, ServerState
from tests.serving.conftest import LiveServer

NAME = "SmolLM2-135M-Instruct"
SHORT = {"type": "string", "maxLength": 24}
SCHEMAS = {
    "person": {"type": "object",
               "properties": {"name": SHORT, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
               "required": ["name", "age"], "additionalProperties": False},
    "optional field": {"type": "object",
                       "properties": {"city": SHORT, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                       "required": ["city"], "additionalProperties": False},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
             "additionalProperties": False},
    "boolean and null": {"type": "object", "properties": {"done": {"type": "boolean"}, "note": {"type": "null"}},
                         "required": ["done", "note"], "additionalProperties": False},
    "number range": {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}},
                     "required": ["score"], "additionalProperties": False},
    "array with bounds": {"type": "object", "properties": {"tags": {"type": "array", "items": SHORT, "minItems": 2,
                                                                       "maxItems": 4}},
                          "required": ["tags"], "additionalProperties": False},
    "array of objects": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
        "type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999}, "label": SHORT},
        "required": ["id", "label"], "additionalProperties": False}},
    "nested objects": {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "name": SHORT, "address": {"type": "object", "properties": {"street": SHORT, "number": {"type": "integer",
                                                                                                "minimum": 1,
                                                                                                "maximum": 9999}},
                                   "required": ["street", "number"], "additionalProperties": False}},
        "required": ["name", "address"], "additionalProperties": False}}, "required": ["user"],
        "additionalProperties": False},
    "$ref and $defs": {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -99,
                                                                                  "maximum": 99},
                                                                            "y": {"type": "integer", "minimum": -99,
                                                                                  "maximum": 99}},
                                           "required": ["x", "y"], "additionalProperties": False}},
                       "type": "object", "properties": {"start": {"$ref": "#/$defs/point"},
                                                        "end": {"$ref": "#/$defs/point"}},
                       "required": ["start", "end"], "additionalProperties": False},
    "anyOf": {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99},
                                                                   {"enum": ["none", "many"]}]}},
              "required": ["value"], "additionalProperties": False},
    "date format": {"type": "object", "properties": {"when": {"type": "string", "format": "date"}},
                    "required": ["when"], "additionalProperties": False},
    "email format": {"type": "object", "properties": {"email": {"type": "string", "format": "email",
                                                                "maxLength": 40}},
                     "required": ["email"], "additionalProperties": False},
    "uuid format": {"type": "object", "properties": {"id": {"type": "string", "format": "uuid"}}, "required": ["id"],
                    "additionalProperties": False},
    "pattern": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}},
                "required": ["code"], "additionalProperties": False},
    "const": {"type": "object", "properties": {"version": {"const": 2}, "kind": {"const": "report"}},
              "required": ["version", "kind"], "additionalProperties": False},
    "integer enum": {"type": "object", "properties": {"stars": {"enum": [1, 2, 3, 4, 5]}}, "required": ["stars"],
                     "additionalProperties": False},
    "string length": {"type": "object", "properties": {"word": {"type": "string", "minLength": 3, "maxLength": 8,
                                                                "pattern": "^[a-z]+$"}},
                      "required": ["word"], "additionalProperties": False},
    "map of integers": {"type": "object", "patternProperties": {"^[a-z]{1,8}$": {"type": "integer", "minimum": 0,
                                                                                 "maximum": 9}},
                        "additionalProperties": False, "maxProperties": 3},
    "oneOf union": {"type": "object", "properties": {"shape": {"oneOf": [
        {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "integer", "minimum": 1,
                                                                             "maximum": 9}},
         "required": ["kind", "r"], "additionalProperties": False},
        {"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "integer", "minimum": 1,
                                                                                "maximum": 9}},
         "required": ["kind", "side"], "additionalProperties": False}]}}, "required": ["shape"],
        "additionalProperties": False},
    "tuple": {"type": "object", "properties": {"pair": {
        "type": "array", "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 9}, {"enum": ["a", "b"]}],
        "items": False, "minItems": 2}}, "required": ["pair"], "additionalProperties": False},
}
SEEDS = (1, 2, 3)


@pytest.fixture(scope="module")
def client(smollm2):
    state = ServerState(ServeConfig(), [ModelSpec(NAME, lambda startup: LLMEngine(
        smollm2, EngineConfig(max_num_seqs=64, max_model_len=1024), startup=startup))])
    server = LiveServer(state).start()
    with openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=600) as client:
        yield client
    server.stop()


@pytest.mark.slow
def test_twenty_schemas_hold_at_temperature_1(client):
    assert len(SCHEMAS) == 20

    def ask(name, seed):
        reply = client.chat.completions.create(
            model=NAME, max_tokens=300, temperature=1.0, seed=seed,
            messages=[{"role": "user", "content": f"Give me an example of a {name} as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "example", "schema": SCHEMAS[name],
                                                                    "strict": True}})
        return name, seed, reply.choices[0]

    with concurrent.futures.ThreadPoolExecutor(len(SCHEMAS) * len(SEEDS)) as pool:
        results = list(pool.map(lambda args: ask(*args), [(n, s) for n in SCHEMAS for s in SEEDS]))
    checker = jsonschema.FormatChecker()
    unfinished = [(name, seed, choice.message.content) for name, seed, choice in results
                  if choice.finish_reason != "stop"]
    assert unfinished == []
    for name, seed, choice in results:
        jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name], format_checker=checker)


@pytest.mark.slow
def test_regex_and_choice_hold_on_the_default_model(client):
    for seed in SEEDS:
        date = client.chat.completions.create(
            model=NAME, max_tokens=20, temperature=1.0, seed=seed,
            messages=[{"role": "user", "content": "When did the French Revolution start?"}],
            extra_body={"structured_outputs": {"regex": r"1[0-9]{3}-[01][0-9]-[0-3][0-9]"}}).choices[0].message.content
        assert re.fullmatch(r"1[0-9]{3}-[01][0-9]-[0-3][0-9]", date)
        answer = client.chat.completions.create(
            model=NAME, max_tokens=8, temperature=1.0, seed=seed,
            messages=[{"role": "user", "content": "Is Paris in France?"}],
            extra_body={"structured_outputs": {"choice": ["yes", "no"]}}).choices[0].message.content
        assert answer in ("yes", "no")
