"""The scheduler on its own: token budget, decode-first order, chunked prompts,
first come first served, preemption. Sampled tokens are synthetic (the step
that would compute them is the runner's job, tested elsewhere)."""

from __future__ import annotations

from engine.block_manager import BlockManager
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import FinishReason, Sequence, SequenceStatus

BS = 4


def _seq(prompt_len, *, start=0, max_tokens=8, name="r"):
    return Sequence(request_id=name, choice=0, prompt_ids=list(range(start, start + prompt_len)),
                    params=SamplingParams(max_tokens=max_tokens), seed=0, arrival_time=0.0)


def _scheduler(*, num_blocks=64, max_num_seqs=8, budget=16):
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget),
                     BlockManager(num_blocks=num_blocks, block_size=BS))


def _step(scheduler):
    """Schedule, then act as the runner: commit chunks, append a token where one is sampled."""
    out = scheduler.schedule()
    for chunk in out.decodes + out.prefills:
        scheduler.commit(chunk)
        if chunk.samples:
            chunk.seq.output_ids.append(1000 + len(chunk.seq.output_ids))
            if len(chunk.seq.output_ids) == chunk.seq.params.max_tokens:
                scheduler.finish(chunk.seq, FinishReason.LENGTH)
    return out


def test_decodes_first_then_prompt_chunks_within_budget():
    sched = _scheduler(budget=16)
    a, b = _seq(6), _seq(40, start=100)
    sched.add(a)
    out = _step(sched)
    assert [(c.seq, c.num_tokens) for c in out.prefills] == [(a, 6)]
    sched.add(b)
    out = _step(sched)  # a decodes (1 token), b gets the remaining 15
    assert [(c.seq, c.num_tokens) for c in out.decodes] == [(a, 1)]
    assert [(c.seq, c.start, c.num_tokens) for c in out.prefills] == [(b, 0, 15)]
    assert not out.prefills[0].samples
    out = _step(sched)  # b's prompt continues while a keeps decoding
    assert [c.seq for c in out.decodes] == [a]
    assert [(c.seq, c.start, c.num_tokens) for c in out.prefills] == [(b, 15, 15)]
    out = _step(sched)
    assert [(c.seq, c.start, c.num_tokens) for c in out.prefills] == [(b, 30, 10)]
    assert out.prefills[0].samples and len(b.output_ids) == 1
    out = _step(sched)
    assert {c.seq for c in out.decodes} == {a, b} and not out.prefills


def test_first_come_first_served_and_max_num_seqs():
    sched = _scheduler(max_num_seqs=2, budget=64)
    seqs = [_seq(5, start=10 * i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    out = _step(sched)
    assert [c.seq for c in out.prefills] == seqs[:2]
    assert list(sched.waiting) == [seqs[2]]
    while seqs[0].status is not SequenceStatus.FINISHED:
        _step(sched)
    out = _step(sched)
    assert seqs[2] in [c.seq for c in out.prefills]


def test_prefix_cache_hit_skips_computed_blocks():
    sched = _scheduler(budget=64)
    first = _seq(10)
    sched.add(first)
    _step(sched)
    twin = _seq(10)
    sched.add(twin)
    out = _step(sched)
    chunk = next(c for c in out.prefills if c.seq is twin)
    assert (chunk.start, chunk.num_tokens) == (8, 2)
    assert sched.block_manager.prefix_cache_hits == 8


def test_preemption_frees_the_latest_and_recomputes_it_later():
    # 6 blocks of 4 tokens; two sequences each growing to 4 + 12 = 16 tokens (4 blocks).
    sched = _scheduler(num_blocks=6, budget=32)
    old, new = _seq(4, max_tokens=12), _seq(4, start=50, max_tokens=12)
    sched.add(old)
    sched.add(new)
    preempted = []
    for _ in range(100):
        if not sched.has_unfinished():
            break
        preempted += _step(sched).preempted
        assert sched.block_manager.num_free_blocks >= 0
    assert preempted and preempted[0] is new  # the later arrival gives way
    assert old.finish_reason is FinishReason.LENGTH and new.finish_reason is FinishReason.LENGTH
    assert len(old.output_ids) == len(new.output_ids) == 12
    assert new.num_preemptions >= 1
    assert sched.block_manager.num_free_blocks == 6


def test_abort_frees_blocks_at_once():
    sched = _scheduler()
    a = _seq(10)
    sched.add(a)
    _step(sched)
    assert sched.block_manager.usage > 0
    sched.abort([a])
    assert a.finish_reason is FinishReason.ABORT and sched.block_manager.usage == 0
    assert not sched.has_unfinished()


def test_deferred_levels_sit_a_step_out_and_keep_their_places():
    from model.numerics import Precision

    sched = _scheduler(budget=32)
    cheap = _seq(4, name="cheap")
    dear = Sequence(request_id="dear", choice=0, prompt_ids=list(range(50, 54)),
                    params=SamplingParams(max_tokens=8, precision="ultra"), seed=0, arrival_time=0.0)
    later = _seq(4, start=200, name="later")
    for seq in (dear, cheap):
        sched.add(seq)
    out = sched.schedule(deferred=frozenset({Precision.ULTRA}))
    assert [c.seq for c in out.prefills] == [cheap]  # the ultra one waits, ahead of nothing
    assert list(sched.waiting) == [dear]
    for chunk in out.prefills:
        sched.commit(chunk)
        chunk.seq.output_ids.append(1)
    sched.add(later)
    out = sched.schedule()  # no deferral: the ultra one is still first in line
    assert [c.seq for c in out.decodes] == [cheap] and [c.seq for c in out.prefills] == [dear, later]
    for chunk in out.decodes + out.prefills:
        sched.commit(chunk)
        chunk.seq.output_ids.append(1)
    out = sched.schedule(deferred=frozenset({Precision.ULTRA}))  # a running ultra sequence sits out too
    assert [c.seq for c in out.decodes] == [cheap, later]
