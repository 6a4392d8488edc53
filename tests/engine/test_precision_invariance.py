"""Batch invariance through the whole engine (a tiny random Llama with a
256-token vocabulary, SmolLM2's tokenizer for its first 256 ids): a needle
prompt's logprobs are the same bits alone and among 12 other prompts
(chunked differently, in another row, prefilling while others decode), and
between decode and prefill, under HIGH and ULTRA. STANDARD is the control:
its differences are printed, not required."""

from __future__ import annotations

import numpy as np
import pytest

from checkpoints.loader import LoadedModel
from checkpoints.safetensors_dir import load_decoder
from engine.llm_engine import EngineConfig, LLMEngine
from engine.sampling import SamplingParams
from model.numerics import Precision
from tests.hf_reference import save_tiny_model

CONFIG = EngineConfig(max_model_len=256, max_num_seqs=16, max_num_batched_tokens=64,
                      kv_cache_memory=8 * 2**20, enable_prefix_caching=False)


def _needle_params(precision: Precision) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=4, logprobs=5, prompt_logprobs=5, precision=precision)


def _run(engine: LLMEngine, requests: list[tuple[str, list[int], SamplingParams]]) -> dict:
    for request_id, ids, params in requests:
        engine.add_request(request_id, ids, params)
    finals = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finals[output.request_id] = output
    return finals


def _signature(output) -> tuple:
    """Every float the needle reports, with its token ids."""
    choice = output.outputs[0]
    prompt = [(lp.token_id, lp.logprob, lp.top) for lp in output.prompt_logprobs or []]
    generated = [(lp.token_id, lp.logprob, lp.top) for lp in choice.logprobs]
    return tuple(choice.token_ids), tuple(prompt), tuple(generated)


def _largest_difference(a: tuple, b: tuple) -> float:
    def floats(sig):
        _, prompt, generated = sig
        return np.array([x for _, lp, top in prompt + generated for x in (lp, *(v for _, v in top))])
    fa, fb = floats(a), floats(b)
    return float(np.abs(fa - fb).max()) if fa.shape == fb.shape else float("inf")


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory, smollm2):
    folder = tmp_path_factory.mktemp("tiny-256")
    save_tiny_model("llama", folder, num_hidden_layers=1, max_position_embeddings=256)
    config, model = load_decoder(folder)
    return LoadedModel(path=folder, config=config, model=model, tokenizer=smollm2.tokenizer)


@pytest.mark.parametrize("precision", list(Precision))
def test_needle_logprobs_are_the_same_bits_in_any_batch(small_vocab_model, precision):
    vocab_size = small_vocab_model.config.vocab_size
    rng = np.random.default_rng(0)
    needle = rng.integers(3, vocab_size, 37).tolist()
    engine = LLMEngine(small_vocab_model, CONFIG)
    alone = _signature(_run(engine, [("needle", needle, _needle_params(precision))])["needle"])
    others = [(f"other-{i}", rng.integers(3, vocab_size, int(rng.integers(3, 17))).tolist(),
               SamplingParams(temperature=0.0, max_tokens=int(rng.integers(1, 6)), precision=precision))
              for i in range(12)]
    others.insert(5, ("needle", needle, _needle_params(precision)))
    batched = _signature(_run(engine, others)["needle"])
    if precision is not Precision.STANDARD:
        assert batched == alone, _largest_difference(alone, batched)

    # Decode vs prefill: the generated tokens, fed back as prompt, get the same logprobs.
    generated = list(alone[0])
    again = _run(engine, [("again", needle + generated[:-1], SamplingParams(
        temperature=0.0, max_tokens=1, prompt_logprobs=5, precision=precision))])["again"]
    as_prompt = [(lp.token_id, lp.logprob, lp.top) for lp in again.prompt_logprobs[-(len(generated) - 1):]]
    decoded = list(alone[2][:len(generated) - 1])
    if precision is not Precision.STANDARD:
        assert as_prompt == decoded
    print(f"{precision.value}: largest difference in a batch {_largest_difference(alone, batched):.3g}")
