"""Constrained decoding in the engine: a tiny random model (every token a fresh, arbitrary
decision) with SmolLM2's tokenizer still writes output that matches its JSON schema, regex,
choice or grammar, with every sampling parameter, n > 1, and at every precision level."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from engine.grammar import GrammarCompiler
from engine.llm_engine import EngineConfig, LLMEngine
from engine.outputs import RejectedField, RequestRejected
from engine.sampler import is_allowed
from engine.sampling import Constraint, SamplingParams

PERSON = {"type": "object", "properties": {"name": {"enum": ["Ada", "Alan", "Grace"]},
                                            "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                            "admin": {"type": "boolean"}},
          "required": ["name", "age", "admin"], "additionalProperties": False}


@pytest.fixture(scope="module")
def engine(tiny_loaded):
    return LLMEngine(tiny_loaded, EngineConfig(max_num_seqs=16, max_num_batched_tokens=128, max_model_len=512,
                                               kv_cache_memory=8 * 2**20))


def run(engine, prompts, params):
    tokenizer = engine.tokenizer
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}-{id(params)}", tokenizer.encode(prompt), params)
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    return [finished[f"r{i}-{id(params)}"] for i in range(len(prompts))]


def texts(outputs):
    return [choice.text for output in outputs for choice in output.outputs]


def test_json_schema_output_validates_for_every_sampling_setting(engine):
    constraint = Constraint("json_schema", json.dumps(PERSON))
    for params in (SamplingParams(max_tokens=64, temperature=0, constraint=constraint),
                   SamplingParams(max_tokens=64, temperature=1.0, seed=7, n=3, constraint=constraint),
                   SamplingParams(max_tokens=64, temperature=0.8, top_k=5, top_p=0.9, min_p=0.05,
                                  repetition_penalty=1.3, presence_penalty=0.5, seed=1, constraint=constraint)):
        outputs = run(engine, ["Describe a person:", "JSON please", "x"], params)
        for output in outputs:
            for choice in output.outputs:
                person = json.loads(choice.text)
                assert set(person) == {"name", "age", "admin"} and person["name"] in ("Ada", "Alan", "Grace")
                assert 0 <= person["age"] <= 120 and isinstance(person["admin"], bool)
                assert choice.finish_reason == "stop"


def test_regex_choice_and_grammar_hold(engine):
    regex = Constraint("regex", r"[0-9]{3}-[a-z]{2,4}")
    assert all(re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)
               for t in texts(run(engine, ["code:"] * 4, SamplingParams(max_tokens=32, seed=3, constraint=regex))))
    choice = Constraint("choice", json.dumps(["positive", "negative", "neutral ☺"]))
    assert set(texts(run(engine, ["mood:"] * 6, SamplingParams(max_tokens=16, seed=5, constraint=choice)))) <= {
        "positive", "negative", "neutral ☺"}
    lark = Constraint("grammar", 'start: "(" num (" + " num)* ")"\nnum: /[1-9][0-9]?/')
    for text in texts(run(engine, ["sum:"] * 4, SamplingParams(max_tokens=48, seed=9, constraint=lark))):
        assert re.fullmatch(r"\([1-9][0-9]?( \+ [1-9][0-9]?)*\)", text), text


def test_constrained_and_free_rows_share_a_batch(engine):
    """An unconstrained row beside constrained ones samples exactly what it samples alone."""
    free = SamplingParams(max_tokens=12, temperature=1.0, seed=11)
    alone = texts(run(engine, ["Once upon"], free))
    constrained = SamplingParams(max_tokens=64, seed=2, constraint=Constraint("json_object"))
    tokenizer = engine.tokenizer
    engine.add_request("free", tokenizer.encode("Once upon"), free)
    for i in range(3):
        engine.add_request(f"json{i}", tokenizer.encode(f"obj {i}"), constrained)
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert finished["free"].outputs[0].text == alone[0]
    for i in range(3):
        if finished[f"json{i}"].outputs[0].finish_reason == "stop":
            assert isinstance(json.loads(finished[f"json{i}"].outputs[0].text), dict)


def test_logprobs_are_those_of_the_constrained_distribution(engine):
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=20,
                            constraint=Constraint("choice", json.dumps(["yes", "no"])))
    (output,) = run(engine, ["answer:"], params)
    first = output.outputs[0].logprobs[0]
    # A few tokens can begin "yes" or "no" (y, ye, yes, n, no): their probabilities sum to 1,
    # and the other alternatives are impossible (-inf; the API reports -9999, as OpenAI does).
    possible = [lp for _, lp in first.top if lp > -np.inf]
    assert 1 <= len(possible) <= 8 and np.isclose(np.exp(possible).sum(), 1.0, atol=1e-4)
    assert all(lp == -np.inf for _, lp in first.top[len(possible):])
    assert output.outputs[0].text in ("yes", "no")


@pytest.mark.parametrize("constraint, message", [
    (Constraint("regex", "(unclosed"), "unsupported regex"),
    (Constraint("grammar", "start: undefined_rule"), "unsupported grammar"),
    (Constraint("json_schema", "{not json"), "not valid JSON"),
])
def test_a_constraint_the_library_cannot_take_is_refused(engine, constraint, message):
    with pytest.raises(RequestRejected, match=message) as refused:
        engine.check_request([1, 2, 3], SamplingParams(constraint=constraint))
    assert refused.value.field is RejectedField.CONSTRAINT


def test_masks_unpack_bit_by_bit(tiny_loaded):
    vocab = tiny_loaded.config.vocab_size
    compiler = GrammarCompiler(tiny_loaded.tokenizer.backend_json(), vocab_size=vocab,
                               eos_token_id=tiny_loaded.tokenizer.eos_token_id)
    matcher = compiler.matcher(Constraint("choice", json.dumps(["yes", "no"])))
    masks = compiler.fill_masks([(matcher, 1)], 3)
    allowed = np.asarray(is_allowed(masks, vocab))
    assert allowed[0].all() and allowed[2].all()  # rows without a matcher allow everything
    expected = np.unpackbits(masks[1].view(np.uint8), bitorder="little")[:vocab].astype(bool)
    assert (allowed[1] == expected).all() and 1 <= allowed[1].sum() <= 10


def test_preempted_constrained_sequences_still_match(tiny_loaded):
    """A pool too small for the batch preempts sequences; their matchers keep their place, and
    every output still validates."""
    cfg = tiny_loaded.config
    block_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * 16 * cfg.head_dim * 4
    # 10 blocks of 16 tokens for 8 sequences of ~40 tokens: they cannot all fit.
    small = LLMEngine(tiny_loaded, EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=128,
                                                kv_cache_memory=10 * block_bytes))
    params = SamplingParams(max_tokens=48, temperature=1.0, seed=4, constraint=Constraint("json_schema",
                                                                                           json.dumps(PERSON)))
    outputs = run(small, [f"Person number {i} is described as" for i in range(8)], params)
    assert small.scheduler.num_preemptions > 0
    for output in outputs:
        person = json.loads(output.outputs[0].text)
        assert person["name"] in ("Ada", "Alan", "Grace")


def test_a_high_precision_constrained_row_is_the_same_bits_in_any_batch(engine):
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=21, logprobs=3, precision="high",
                            constraint=Constraint("json_schema", json.dumps(PERSON)))
    (alone,) = run(engine, ["Needle:"], params)
    batch = run(engine, ["Needle:", "hay one", "hay two, longer", "hay"],
                SamplingParams(**{**{f: getattr(params, f) for f in ("max_tokens", "temperature", "logprobs",
                                                                        "precision", "constraint")}, "seed": 21}))
    needle = batch[0].outputs[0]
    assert needle.token_ids == alone.outputs[0].token_ids
    assert [lp.logprob for lp in needle.logprobs] == [lp.logprob for lp in alone.outputs[0].logprobs]
