"""The engine end to end on a tiny random model with a real tokenizer:
continuous batching gives each request what it would get alone."""

from __future__ import annotations

import numpy as np
import pytest

from engine.llm import LLM
from engine.llm_engine import EngineConfig, LLMEngine
from engine.outputs import RejectedField, RequestRejected
from engine.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _prompts(tokenizer, count, seed=0):
    rng = np.random.default_rng(seed)
    words = ["apple", "river", "quantum", "blue", "seven", "castle", "piano", "orbit", "lemon", "storm"]
    return [tokenizer.encode(" ".join(rng.choice(words, size=rng.integers(2, 40)))) for _ in range(count)]


@pytest.fixture(scope="module")
def alone(tiny_loaded):
    """Runs one request at a time, with no prefix cache: the reference path."""
    engine = LLMEngine(tiny_loaded, EngineConfig(max_num_seqs=1, max_num_batched_tokens=64,
                                                 max_model_len=256, enable_prefix_caching=False))

    def run(prompt, params=GREEDY):
        engine.add_request("alone", prompt, params)
        while True:
            for out in engine.step():
                if out.finished:
                    return out.outputs[0].token_ids
    return run


def test_staggered_arrivals_match_each_prompt_alone(tiny_loaded, alone):
    prompts = _prompts(tiny_loaded.tokenizer, 32)
    engine = LLMEngine(tiny_loaded, EngineConfig(max_num_seqs=16, max_num_batched_tokens=64,
                                                 max_model_len=256))
    finished = {}
    pending = list(enumerate(prompts))
    steps = 0
    while pending or engine.has_unfinished_requests():
        # Two new requests every other step, while earlier ones are mid-stream.
        if steps % 2 == 0:
            for _ in range(2):
                if pending:
                    i, prompt = pending.pop(0)
                    engine.add_request(f"r{i}", prompt, GREEDY)
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
        steps += 1
    for i, prompt in enumerate(prompts):
        assert finished[f"r{i}"] == alone(prompt), i


def test_prefix_cache_hit_matches_miss_and_is_counted(tiny_loaded):
    system = tiny_loaded.tokenizer.encode("You are a terse assistant. " * 8)
    prompt = system + tiny_loaded.tokenizer.encode(" Question: what is two plus two?")
    llm = LLM(tiny_loaded, config=EngineConfig(max_num_seqs=4, max_model_len=256))
    miss = llm.generate([prompt], GREEDY)[0]
    hits_before = llm.engine.block_manager.prefix_cache_hits
    hit = llm.generate([prompt], GREEDY)[0]
    assert hit.outputs[0].token_ids == miss.outputs[0].token_ids
    assert llm.engine.block_manager.prefix_cache_hits - hits_before >= 16 * (len(prompt) // 16 - 1)
    assert hit.num_cached_tokens > 0 and miss.num_cached_tokens == 0


def test_tiny_pool_preempts_and_still_matches(tiny_loaded, alone):
    prompts = _prompts(tiny_loaded.tokenizer, 6, seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    # 12 blocks of 16 tokens for 6 sequences of up to ~80 tokens: they cannot all fit.
    llm = LLM(tiny_loaded, config=EngineConfig(max_num_seqs=6, max_num_batched_tokens=64,
                                               max_model_len=128, kv_cache_memory=_bytes_for(tiny_loaded, 12)))
    assert llm.engine.num_blocks == 12
    outputs = llm.generate(prompts, params)
    assert llm.engine.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outputs):
        assert out.outputs[0].token_ids == alone(prompt, params)
    assert llm.engine.block_manager.usage == 0


def _bytes_for(loaded, num_blocks, block_size=16):
    cfg = loaded.config
    return num_blocks * 2 * cfg.num_layers * cfg.num_kv_heads * block_size * cfg.head_dim * 4


def test_seeded_sampling_same_alone_and_in_a_batch_of_16(tiny_loaded):
    prompts = _prompts(tiny_loaded.tokenizer, 16, seed=5)
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=10, seed=1234, ignore_eos=True)
    llm = LLM(tiny_loaded, config=EngineConfig(max_num_seqs=16, max_model_len=256))
    together = llm.generate(prompts, params)
    alone = llm.generate([prompts[7]], params)[0]
    assert together[7].outputs[0].token_ids == alone.outputs[0].token_ids
    assert len({tuple(o.outputs[0].token_ids) for o in together}) > 1


def test_n_choices_share_the_prompt(tiny_loaded):
    prompt = tiny_loaded.tokenizer.encode("Once upon a time in a land far away " * 4)
    llm = LLM(tiny_loaded, config=EngineConfig(max_model_len=256))
    out = llm.generate([prompt], SamplingParams(n=4, temperature=1.0, max_tokens=8, seed=7,
                                                ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert all(len(o.token_ids) == 8 for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1  # choices differ
    assert llm.engine.block_manager.prefix_cache_hits >= 3 * 16 * (len(prompt) // 16 - 1)


def test_finish_reasons_and_max_tokens(tiny_loaded):
    llm = LLM(tiny_loaded, config=EngineConfig(max_model_len=256))
    out = llm.generate(["hello there"], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 5
    first = out.outputs[0].token_ids[2]
    stopped = llm.generate(["hello there"], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True,
                                                            stop_token_ids=(first,)))[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == first
    assert stopped.token_ids == out.outputs[0].token_ids[:3]
    with_min = llm.generate(["hello there"], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True,
                                                             min_tokens=5, stop_token_ids=(first,)))[0]
    assert first not in with_min.outputs[0].token_ids and with_min.outputs[0].finish_reason == "length"


def test_prompt_too_long_is_refused(tiny_loaded):
    engine = LLMEngine(tiny_loaded, EngineConfig(max_model_len=64))
    with pytest.raises(ValueError, match="maximum context length"):
        engine.add_request("x", list(range(60)), SamplingParams(max_tokens=10))
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("prompt, params, field, is_context_length", [
    ([], SamplingParams(), RejectedField.PROMPT, False),
    ([1, 10**9], SamplingParams(), RejectedField.PROMPT, False),
    (list(range(64)), SamplingParams(max_tokens=1), RejectedField.PROMPT, True),  # fills the context alone
    (list(range(60)), SamplingParams(max_tokens=10), RejectedField.MAX_TOKENS, True),
    ([1, 2], SamplingParams(logit_bias={10**9: 1.0}), RejectedField.LOGIT_BIAS, False),
    ([1, 2], SamplingParams(stop_token_ids=[10**9]), RejectedField.STOP_TOKEN_IDS, False),
])
def test_check_request_names_what_it_refuses(tiny_loaded, prompt, params, field, is_context_length):
    """The one contract of what the engine accepts: callers map `field` onto their own parameter."""
    engine = LLMEngine(tiny_loaded, EngineConfig(max_model_len=64, max_num_seqs=1, kv_cache_memory=2**20))
    with pytest.raises(RequestRejected) as info:
        engine.check_request(prompt, params, max_tokens_name="max_length")
    assert (info.value.field, info.value.is_context_length) == (field, is_context_length)
    if field is RejectedField.MAX_TOKENS:
        assert "max_length asks for 10 more" in str(info.value)
    engine.check_request([1, 2], SamplingParams(max_tokens=8))  # a request that fits passes
