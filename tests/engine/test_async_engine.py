"""The async engine: concurrent streams from one event loop, early exit aborts."""

from __future__ import annotations

import asyncio

import pytest

from engine.async_engine import AsyncEngine, EngineDeadError
from engine.llm import LLM
from engine.llm_engine import EngineConfig, LLMEngine
from engine.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture()
def engines(tiny_loaded):
    async_engine = AsyncEngine(LLMEngine(tiny_loaded, EngineConfig(max_num_seqs=8, max_model_len=256)))
    yield async_engine
    async_engine.shutdown(timeout=30)


async def _collect(engine, request_id, prompt_ids, params=GREEDY):
    outputs = [out async for out in engine.generate(request_id, prompt_ids, params)]
    return outputs


def test_concurrent_streams_match_offline_results(engines, tiny_loaded):
    tokenizer = tiny_loaded.tokenizer
    prompts = [tokenizer.encode(f"Request number {i} says hello") for i in range(8)]

    async def main():
        return await asyncio.gather(*(_collect(engines, f"r{i}", p) for i, p in enumerate(prompts)))

    streams = asyncio.run(main())
    offline = LLM(tiny_loaded, config=EngineConfig(max_model_len=256)).generate(prompts, GREEDY)
    for outputs, reference in zip(streams, offline):
        assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
        assert outputs[-1].outputs[0].token_ids == reference.outputs[0].token_ids
        # Cumulative: each output extends the previous one.
        lengths = [len(o.outputs[0].token_ids) for o in outputs]
        assert lengths == sorted(lengths) and lengths[-1] == 10


def test_leaving_a_stream_early_aborts_and_frees_blocks(engines, tiny_loaded):
    prompt = tiny_loaded.tokenizer.encode("A long story begins " * 5)

    async def main():
        long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
        async for output in engines.generate("leaver", prompt, long):
            if len(output.outputs[0].token_ids) >= 3:
                break
        # The abort is handled by the engine thread; wait for it to drain.
        for _ in range(200):
            if not engines.engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
        return await _collect(engines, "after", prompt)

    after = asyncio.run(main())
    assert after[-1].finished
    assert engines.engine.block_manager.usage == 0


def test_refused_request_raises_and_the_engine_keeps_serving(engines, tiny_loaded):
    async def main():
        with pytest.raises(ValueError, match="maximum context length"):
            await _collect(engines, "too-long", list(range(300)))
        return await _collect(engines, "fine", tiny_loaded.tokenizer.encode("ok"))

    assert asyncio.run(main())[-1].finished


def test_shutdown_rejects_new_requests(tiny_loaded):
    engine = AsyncEngine(LLMEngine(tiny_loaded, EngineConfig(max_model_len=64)))
    engine.shutdown(timeout=30)

    async def main():
        with pytest.raises(EngineDeadError):
            await _collect(engine, "late", [1, 2, 3])

    asyncio.run(main())


def test_a_caller_bug_fails_its_request_only(engines, tiny_loaded):
    # Token ids that are not integers make the engine's own checks raise a
    # TypeError, not a refusal: that request fails, the engine thread lives on.
    async def main():
        with pytest.raises(RuntimeError, match="cannot add the request"):
            await _collect(engines, "bad", ["not", "ids"])
        return await _collect(engines, "fine", tiny_loaded.tokenizer.encode("ok"))

    assert asyncio.run(main())[-1].finished
    assert engines.is_running


def test_shutdown_fails_the_requests_in_flight(tiny_loaded):
    engine = AsyncEngine(LLMEngine(tiny_loaded, EngineConfig(max_model_len=256)))
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

    async def main():
        stream = engine.generate("long", tiny_loaded.tokenizer.encode("Once upon a time"), long)
        await stream.__anext__()  # running
        engine.shutdown(timeout=30)
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass

    asyncio.run(main())
    assert not engine.is_running
