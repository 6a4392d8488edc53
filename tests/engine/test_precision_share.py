"""The time share of the expensive precision levels (engine.precision_share), on its own and in
an engine serving a STANDARD and an ULTRA request together."""

from __future__ import annotations

import pytest

from engine.precision_share import PrecisionShare

BOTH = {"has_cheap_work": True, "has_expensive_work": True}


def test_expensive_calls_take_at_most_their_share_of_the_time():
    share = PrecisionShare(0.25)
    cheap, dear = 0.01, 0.5  # seconds of one STANDARD and one ULTRA call
    spent = {"cheap": 0.0, "dear": 0.0}
    for _ in range(10_000):
        deferred = share.defers_expensive(**BOTH)
        expensive = 0.0 if deferred else dear
        share.record(cheap_seconds=cheap, expensive_seconds=expensive, **BOTH)
        spent["cheap"] += cheap
        spent["dear"] += expensive
    fraction = spent["dear"] / (spent["cheap"] + spent["dear"])
    assert 0.2 < fraction <= 0.25 + dear / (spent["cheap"] + spent["dear"])


def test_nothing_is_deferred_without_both_kinds_of_work():
    share = PrecisionShare(0.25)
    share.record(cheap_seconds=0.01, expensive_seconds=5.0, **BOTH)
    assert share.defers_expensive(**BOTH)
    assert not share.defers_expensive(has_cheap_work=False, has_expensive_work=True)
    assert not share.defers_expensive(has_cheap_work=True, has_expensive_work=False)
    # With no STANDARD work left the debt is forgiven: an ULTRA request alone runs every step.
    share.record(cheap_seconds=0.0, expensive_seconds=5.0, has_cheap_work=False, has_expensive_work=True)
    assert not share.defers_expensive(**BOTH)


def test_credit_is_not_saved_up_while_no_expensive_work_waits():
    share = PrecisionShare(0.25)
    for _ in range(1000):
        share.record(cheap_seconds=1.0, expensive_seconds=0.0, has_cheap_work=True, has_expensive_work=False)
    assert share.credit == 0.0


def test_a_share_of_one_never_defers_and_nonsense_is_refused():
    share = PrecisionShare(1.0)
    share.record(cheap_seconds=0.0, expensive_seconds=100.0, **BOTH)
    assert not share.defers_expensive(**BOTH)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            PrecisionShare(bad)


def test_an_engine_defers_ultra_while_standard_streams_and_both_finish(tiny_loaded):
    """One STANDARD and one ULTRA request in one engine: ULTRA's calls are left out of some steps
    (not all), both requests finish with every token, and ULTRA's tokens are the ones it produces
    alone (deferring never changes what a level computes)."""
    from engine.llm_engine import EngineConfig, LLMEngine
    from engine.sampling import SamplingParams

    engine = LLMEngine(tiny_loaded, EngineConfig(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64,
                                                 kv_cache_memory=2**20, high_precision_share=0.25))
    prompt = tiny_loaded.tokenizer.encode("The river flows")
    ultra = SamplingParams(max_tokens=6, precision="ultra", ignore_eos=True, seed=7)
    engine.add_request("alone", prompt, ultra)
    alone = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            alone = output
    engine.add_request("ultra", prompt, ultra)
    engine.add_request("standard", prompt, SamplingParams(max_tokens=40, ignore_eos=True))
    steps_without_ultra = 0
    finals = {}
    while engine.has_unfinished_requests():
        outputs = engine.step()
        if "ultra" not in {o.request_id for o in outputs}:
            steps_without_ultra += 1
        finals.update({o.request_id: o for o in outputs if o.finished})
    assert steps_without_ultra > 0
    assert len(finals["standard"].outputs[0].token_ids) == 40
    assert finals["ultra"].outputs[0].token_ids == alone.outputs[0].token_ids
