"""What requests get back: logprobs against a float64 log-softmax of the
reference logits, stop strings across token boundaries, and no compilation
after warm-up."""

from __future__ import annotations

import logging

import jax.numpy as jnp
import numpy as np
import pytest

from engine.llm import LLM
from engine.llm_engine import EngineConfig, LLMEngine
from tests.forward import PagedForward
from engine.sampler import sample_tokens
from engine.sampling import SamplingParams
from model.kv_cache import KVCache


@pytest.fixture(scope="module")
def llm(tiny_loaded):
    return LLM(tiny_loaded, config=EngineConfig(max_num_seqs=8, max_model_len=256))


def _reference_logprobs(loaded, token_ids):
    """float64 log-softmax of a plain full forward's logits, [T, V]."""
    runner = PagedForward(loaded.model)
    n = len(token_ids)
    pages = -(-n // 16)
    logits, _ = runner.forward(jnp.asarray([token_ids]), jnp.arange(n)[None],
                               KVCache.zeros(loaded.config, num_pages=pages, page_size=16),
                               jnp.arange(pages, dtype=jnp.int32)[None], jnp.ones((1, n), bool),
                               all_positions=True)
    x = np.asarray(logits[0], np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_logprobs_match_a_log_softmax_of_the_reference_logits(llm, tiny_loaded):
    prompt = tiny_loaded.tokenizer.encode("The weather today is rather")
    out = llm.generate([prompt], SamplingParams(temperature=0.7, seed=3, max_tokens=8, logprobs=5,
                                                prompt_logprobs=3, ignore_eos=True))[0]
    completion = out.outputs[0]
    reference = _reference_logprobs(tiny_loaded, prompt + completion.token_ids)
    assert len(completion.logprobs) == 8
    for i, entry in enumerate(completion.logprobs):
        row = reference[len(prompt) - 1 + i]
        assert entry.token_id == completion.token_ids[i]
        assert entry.logprob == pytest.approx(row[entry.token_id], abs=1e-5)
        top_ids = [t for t, _ in entry.top]
        assert top_ids == list(np.argsort(-row)[:5])
        np.testing.assert_allclose([lp for _, lp in entry.top], np.sort(row)[::-1][:5], atol=1e-5)
    # Prompt logprobs: position i predicts prompt token i + 1.
    assert [e.token_id for e in out.prompt_logprobs] == prompt[1:]
    for i, entry in enumerate(out.prompt_logprobs):
        assert entry.logprob == pytest.approx(reference[i][prompt[i + 1]], abs=1e-5)
        assert len(entry.top) == 3


def test_stop_string_split_across_tokens(llm, tiny_loaded):
    tokenizer = tiny_loaded.tokenizer
    prompt = tokenizer.encode("Tell me something")
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    free = llm.generate([prompt], greedy)[0].outputs[0]
    text = free.text
    # Character offsets where each token's text ends.
    ends = [len(tokenizer.decode(free.token_ids[:k])) for k in range(1, len(free.token_ids) + 1)]
    boundary = next(e for a, e, b in zip(ends, ends[1:], ends[2:])
                    if e - a >= 2 and b - e >= 2 and text.find(text[e - 2:e + 2]) == e - 2)
    stop = text[boundary - 2:boundary + 2]  # two characters from each side of a token boundary
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                                stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:boundary - 2]
    kept = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop],
                                                 include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == text[:boundary + 2]


@pytest.mark.parametrize("attention_backend", ["xla", "pallas"])
def test_nothing_compiles_after_warmup(tiny_loaded, attention_backend):
    engine = LLMEngine(tiny_loaded, EngineConfig(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=96,
                                                 warmup=True, attention_backend=attention_backend))
    # Every bucketed forward compiled ahead, from shapes, into the runner's table; none through jit.
    assert len(engine.runner._compiled) == len(engine.runner.bucket_shapes())
    assert set(engine.startup.seconds) == {"place", "compile"}
    compiled = engine.runner._step._cache_size()
    compiled_samplers = sample_tokens._cache_size()
    tokenizer = tiny_loaded.tokenizer
    prompts = ["hi", "a somewhat longer prompt " * 3, "word " * 40, "x"]
    params = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.9, top_p=0.8, top_k=40, seed=1, max_tokens=30),
              SamplingParams(temperature=1.0, min_p=0.1, max_tokens=9),
              SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)]
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", tokenizer.encode(prompt), p)
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.runner._step._cache_size() == compiled
    assert len(engine.runner._compiled) == len(engine.runner.bucket_shapes())
    assert sample_tokens._cache_size() == compiled_samplers


def test_the_warmup_reports_each_program_compiled(tiny_loaded, caplog):
    """Off a terminal the compile's progress is a log line per tenth, ending at M/M programs, and
    at STANDARD on the XLA path the page count is no compile axis: one table width for all."""
    with caplog.at_level(logging.INFO, logger="balansis.startup"):
        engine = LLMEngine(tiny_loaded, EngineConfig(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=96,
                                                     warmup=True, attention_backend="xla"))
    shapes = engine.runner.bucket_shapes()
    assert len({p for _, _, p in shapes}) == 1
    num_samplers = 2  # rows in powers of four, up to 4: 1 and 4
    total = len(shapes) + num_samplers
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.endswith(f"compiling {total} programs") for m in messages)
    assert any(m.endswith(f"compiled {total}/{total} programs") for m in messages)
    assert any(" compile in " in m for m in messages) and any(" place in " in m for m in messages)
