"""Continuous batching: which tokens of which sequences run in the next step.

Plain Python over `Sequence` objects and the `BlockManager`; no device code.

Each step has a token budget. Running sequences that decode (one new token
each) are scheduled first, so a long prompt never stalls running streams;
the rest of the budget goes to prompt chunks — first those of sequences
already part-way through their prompt, then new sequences in arrival order
(first come, first served: a waiting sequence that does not fit blocks the
ones behind it). When the pool runs out of blocks, the most recently
arrived running sequence is preempted: its blocks are freed and it starts
again later by recomputing its tokens (prefix-cache hits make that cheap).
A step may defer some precision levels (engine.precision_share): their
sequences sit that step out, running or waiting, and hold their places.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Iterable

from engine.block_manager import BlockManager
from engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclasses.dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # sequences running at once
    max_num_batched_tokens: int = 512  # token budget of one step

    def __post_init__(self):
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be at least max_num_seqs, so every "
                             "running sequence can decode in one step")


@dataclasses.dataclass(frozen=True, slots=True)
class ScheduledChunk:
    """Tokens [start, start + num_tokens) of `seq` are computed this step."""

    seq: Sequence
    start: int
    num_tokens: int
    samples: bool  # the chunk reaches the sequence's last token: its logits pick the next one

    @classmethod
    def next_for(cls, seq: Sequence, num_tokens: int) -> "ScheduledChunk":
        start = seq.num_computed_tokens
        return cls(seq, start, num_tokens, start + num_tokens == seq.num_tokens)


@dataclasses.dataclass(frozen=True, slots=True)
class SchedulerOutput:
    decodes: list[ScheduledChunk]  # one token each
    prefills: list[ScheduledChunk]  # prompt (or recompute) chunks
    preempted: list[Sequence]

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(c.num_tokens for c in self.prefills)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, *, cache_salt: bytes = b""):
        self.config = config
        self.block_manager = block_manager
        self.cache_salt = cache_salt
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # in order of admission
        self.num_preemptions = 0

    # -- queues ---------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End `seq` (finished or aborted): its blocks are freed at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.free(seq.seq_id)

    def abort(self, seqs: Iterable[Sequence]) -> None:
        for seq in seqs:
            if not seq.is_finished:
                self.finish(seq, FinishReason.ABORT)

    # -- one step ----------------------------------------------------------------
    def schedule(self, *, deferred: frozenset = frozenset()) -> SchedulerOutput:
        """The next step's chunks; sequences whose precision level is in `deferred` sit it out."""
        budget = self.config.max_num_batched_tokens
        decodes: list[ScheduledChunk] = []
        prefills: list[ScheduledChunk] = []
        preempted: list[Sequence] = []

        # Running sequences: decodes first, then unfinished prompt chunks.
        # Victims for preemption come from the back (the latest admitted).
        running = [s for s in self.running if s.params.precision not in deferred]
        queue = collections.deque(
            [s for s in running if s.num_tokens - s.num_computed_tokens == 1]
            + [s for s in running if s.num_tokens - s.num_computed_tokens > 1])
        while queue and budget > 0:
            seq = queue.popleft()
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.allocate(seq.seq_id, seq.num_computed_tokens + num_new):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                chunk = ScheduledChunk.next_for(seq, num_new)
                (decodes if num_new == 1 and chunk.samples and seq.is_prompt_computed
                 else prefills).append(chunk)
                budget -= num_new

        # New (or preempted) sequences, first come first served (deferred ones keep their places).
        for seq in [s for s in self.waiting if s.params.precision not in deferred]:
            if budget <= 0 or preempted or len(self.running) >= self.config.max_num_seqs:
                break
            tokens = seq.token_ids
            if seq.uses_prefix_cache:
                seq.num_computed_tokens = self.block_manager.reference_cached_prefix(
                    seq.seq_id, tokens, cache_salt=self._salt(seq))
            num_new = min(len(tokens) - seq.num_computed_tokens, budget)
            if not self.block_manager.allocate(seq.seq_id, seq.num_computed_tokens + num_new):
                self.block_manager.free(seq.seq_id)  # drop the prefix references again
                seq.num_computed_tokens = 0
                break
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            prefills.append(ScheduledChunk.next_for(seq, num_new))
            budget -= num_new
        return SchedulerOutput(decodes, prefills, preempted)

    def commit(self, chunk: ScheduledChunk) -> None:
        """Record that the step computed `chunk` (call before appending a sampled token)."""
        seq = chunk.seq
        seq.num_computed_tokens = chunk.start + chunk.num_tokens
        self.block_manager.commit_computed(seq.seq_id, seq.token_ids, seq.num_computed_tokens,
                                           cache_salt=self._salt(seq))

    def _salt(self, seq: Sequence) -> bytes:
        # KV computed at one precision level is not reused by another.
        level = seq.params.precision
        if level is None or level.value == "standard":
            return self.cache_salt
        return self.cache_salt + b"precision:" + level.value.encode()

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
