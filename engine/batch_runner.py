"""Runs one scheduled step on the device: packs it into padded arrays, calls
the compiled forward, then the compiled sampler, returns what each sequence got.

Where host and device meet (STYLE.md habit 2). Decodes and prompt chunks
run as separate compiled calls, each padded to bucketed shapes:

- decode:  [B, 1] tokens, B a power of two ≤ max_num_seqs;
- prefill: chunks grouped by their length bucket T (a power of two
  ≥ MIN_PREFILL_TOKENS), one [B, T] call per group, B a power of four (or
  the group's largest possible count). Every chunk in a group is longer
  than T/2 (bar the smallest group), so padding tokens at most doubles the
  work and B·T stays within a small multiple of the token budget. Rows in
  powers of four, not two, cut the default shapes' prefill programs from
  26 to 17 (~12 s of a cold start on 2 cores) for up to 4× padded rows in a
  prefill call, which runs once per prompt chunk, not once per token;
- both:    block tables of P pages. At STANDARD on the XLA path P is always
  the longest context's (model.attention.blockwise reads only the blocks the
  call's longest row reaches), so it is no compile axis there; elsewhere
  (HIGH, ULTRA, the Pallas kernels) P is a power of two ≥ MIN_PAGES, so
  attention reads about as many pages as the longest context in the call.

So the set of programs is bounded and `warmup` can compile all of them.
The sampler is a program of its own, compiled per row count only, in powers
of four (1, 4, 16, 64: the forward pads its logits to them): 4 programs
instead of 7 saves ~7 s of a cold start, for at most 4× the rows in a step's
sampling, a few ms at 64 rows against a step of hundreds. Inside every
(B, T, P) forward program it made up three quarters of the machine code,
and XLA:CPU maps each kernel's code separately, so ~200 such programs ran
into Linux's limit of 65530 memory mappings per process. The KV cache lives
here and is donated to every call, so XLA updates it in place.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import functools
import os
import time
from typing import Callable, Sequence as Seq

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from engine import distributed
from engine.buckets import bucket, powers_of_two
from engine.packing import Layout, pack, unpack
from engine.sampler import SampleResult, SamplingRow, pack_sampling, sample_tokens
from engine.sampling import MAX_LOGPROBS, SamplingParams
from engine.scheduler import ScheduledChunk, SchedulerOutput
from engine.startup import CompileProgress
from engine.outputs import TokenLogprobs
from model import attention, numerics, sharding
from model.attention import AttentionBackend
from model.numerics import Precision
from model.kv_cache import KVCache
from model.llama import LlamaForCausalLM

MIN_PREFILL_TOKENS = 16  # short prompts share one program
MIN_PAGES = 1  # block tables are padded to a power of two of pages
_WARMUP_PARAMS = SamplingParams(temperature=0.0, max_tokens=1)


@dataclasses.dataclass(frozen=True, slots=True)
class StepOutput:
    """What one sequence got from a step (only chunks that sample, plus prompt logprobs)."""

    token_id: int | None
    logprobs: TokenLogprobs | None  # when the request asked for logprobs
    prompt_logprobs: list[TokenLogprobs] | None  # for this chunk's positions, when asked
    is_stable: bool | None = None  # the sampled token's decision margin beat twice its rounding bound


class BatchRunner:
    def __init__(self, model: LlamaForCausalLM, *, num_blocks: int, block_size: int,
                 max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 eos_token_id: int | None, mesh: Mesh, kv_dtype, attention_backend: str = "auto"):
        self.config = model.config
        # The weights lie on the mesh already (model.sharding.shard_model); the cache goes there
        # too, and every step runs over all of it.
        self.mesh = mesh
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_pages = -(-max_model_len // block_size)
        self.eos_token_id = eos_token_id
        # Which attention each precision level runs (model.attention.choose_backend), fixed here.
        platform = mesh.devices.flat[0].platform
        self.attention = {p: attention.choose_backend(attention_backend, precision=p, platform=platform,
                                                      num_devices=mesh.devices.size) for p in Precision}
        self.graphdef, self.state = nnx.split(model)
        # The LM head's weights, for the sampler's stability check (the same arrays, no copy).
        self._head_is_vd = model.config.tie_word_embeddings
        self._head = model.embed_tokens[...] if self._head_is_vd else model.lm_head[...]
        kv_sharding = sharding.kv_cache_sharding(self.config, self.mesh)
        self.kv = KVCache.zeros(self.config, num_pages=num_blocks, page_size=block_size, dtype=kv_dtype,
                                sharding=kv_sharding)
        self._state_shardings = jax.tree.map(lambda a: a.sharding, self.state)
        self._kv_sharding = kv_sharding
        self._step = _compiled_step(self.graphdef, self.mesh, self._state_shardings, kv_sharding)
        # HIGH's and ULTRA's weights, cut into their slices once, on the first call that needs them
        # (a server that never computes at those levels never holds them), and the program taking them.
        self._sliced = None
        self._sliced_step = None
        self._compiled: dict = {}  # (layout, with prompt logprobs, precision) → what `warmup` compiled ahead
        self.last_step_seconds: dict[Precision, float] = {}  # the latest step's wall time per level
        self._channel = distributed.CallChannel() if distributed.is_multi_process() else None
        if self._channel is not None and self._channel.is_leader:
            atexit.register(self.close)  # however process 0 ends, the others' `follow` returns

    # -- shapes ------------------------------------------------------------------
    def _pages_bucket(self, num_pages: int, precision: Precision) -> int:
        """The block table's width for a call whose longest row spans `num_pages`."""
        if self._has_full_tables(precision):
            return self.max_pages
        return min(bucket(num_pages, minimum=MIN_PAGES), bucket(self.max_pages))

    def _has_full_tables(self, precision: Precision) -> bool:
        """Whether calls at `precision` take whole-context block tables (model.attention.blockwise)."""
        return precision is Precision.STANDARD and self.attention[precision] is AttentionBackend.XLA

    def _length_bucket(self, num_tokens: int) -> int:
        return bucket(num_tokens, minimum=MIN_PREFILL_TOKENS)

    def _max_prefill_rows(self, t: int) -> int:
        """The most chunks a prefill group of length bucket `t` can hold: they are longer than t/2
        (except in the smallest group), within the token budget and the sequence limit."""
        shortest = 1 if t == MIN_PREFILL_TOKENS else t // 2 + 1
        return min(self.max_num_seqs, self.max_num_batched_tokens // shortest)

    def _prefill_rows(self, num_chunks: int, t: int) -> int:
        return min(bucket(num_chunks, factor=4), bucket(self._max_prefill_rows(t)))

    def _sampler_rows(self, b: int) -> int:
        """The rows the sampler runs for a call of `b` rows: the sampling arrays' and the logits' padding."""
        return min(bucket(b, factor=4), bucket(self.max_num_seqs))

    def bucket_shapes(self, precision: Precision = Precision.STANDARD) -> list[tuple[int, int, int]]:
        """Every (B, T, P) a call at `precision` can be padded to; decode is T = 1."""
        pages = sorted({self._pages_bucket(p, precision) for p in range(1, self.max_pages + 1)})
        max_rows = bucket(self.max_num_seqs)
        decode = [(b, 1, p) for b in powers_of_two(max_rows) for p in pages]
        prefill = []
        for t in powers_of_two(self._length_bucket(self.max_num_batched_tokens)):
            if t < MIN_PREFILL_TOKENS:
                continue
            rows = sorted({self._prefill_rows(n, t) for n in range(1, self._max_prefill_rows(t) + 1)})
            prefill += [(b, t, p) for b in rows for p in pages if p * self.block_size >= t]
        return decode + prefill

    # -- one step ----------------------------------------------------------------
    def execute(self, scheduled: SchedulerOutput, block_tables: dict[int, list[int]]) -> dict[int, StepOutput]:
        """Run the step; keys are seq_ids of the chunks that sampled or asked for prompt logprobs."""
        results: dict[int, StepOutput] = {}
        # Each call ends with its results on the host, so its wall time is its own: the engine shares
        # time between precision levels by it (engine.precision_share).
        self.last_step_seconds = {}
        # One call per precision level (a static argument of the programs).
        decodes: dict[Precision, list[ScheduledChunk]] = {}
        for chunk in scheduled.decodes:
            decodes.setdefault(_precision(chunk), []).append(chunk)
        calls = [(chunks, True, precision) for precision, chunks in decodes.items()]
        groups: dict[tuple[Precision, int], list[ScheduledChunk]] = {}
        for chunk in scheduled.prefills:
            groups.setdefault((_precision(chunk), self._length_bucket(chunk.num_tokens)), []).append(chunk)
        calls += [(chunks, False, precision) for (precision, _), chunks in groups.items()]
        for chunks, is_decode, precision in calls:
            started = time.perf_counter()
            results.update(self._run(chunks, block_tables, is_decode=is_decode, precision=precision))
            self.last_step_seconds[precision] = (self.last_step_seconds.get(precision, 0.0)
                                                 + time.perf_counter() - started)
        return results

    def _run(self, chunks: Seq[ScheduledChunk], block_tables, *, is_decode: bool,
             precision: Precision) -> dict[int, StepOutput]:
        t = 1 if is_decode else self._length_bucket(max(c.num_tokens for c in chunks))
        b = bucket(len(chunks)) if is_decode else self._prefill_rows(len(chunks), t)
        max_pages = max(-(-(c.start + c.num_tokens) // self.block_size) for c in chunks)
        p = max(self._pages_bucket(max_pages, precision), -(-t // self.block_size))
        token_ids = np.zeros((b, t), np.int32)
        next_ids = np.zeros((b, t), np.int32)
        positions = np.zeros((b, t), np.int32)
        is_valid = np.zeros((b, t), bool)
        # Padding entries of a block table point at page 0: they are read
        # only for key positions the causal mask hides.
        tables = np.zeros((b, p), np.int32)
        for row, chunk in enumerate(chunks):
            seq_ids = chunk.seq.token_ids
            n = chunk.num_tokens
            token_ids[row, :n] = seq_ids[chunk.start:chunk.start + n]
            following = seq_ids[chunk.start + 1:chunk.start + n + 1]
            next_ids[row, :len(following)] = following
            positions[row, :n] = np.arange(chunk.start, chunk.start + n)
            positions[row, n:] = chunk.start + n - 1  # padding stays inside the row's context
            is_valid[row, :n] = True
            table = block_tables[chunk.seq.seq_id]
            tables[row, :len(table)] = table

        arrays = pack_sampling([self._sampling_row(c) for c in chunks],
                               vocab_size=self.config.vocab_size, batch_size=self._sampler_rows(b))
        wants_logprobs = any(c.seq.params.logprobs is not None for c in chunks)
        wants_prompt_logprobs = not is_decode and any(
            c.seq.params.prompt_logprobs is not None for c in chunks)
        # Static: a batch without logprobs skips the log-softmax.
        call = _DeviceCall((token_ids, positions, tables, is_valid, arrays, next_ids), wants_prompt_logprobs,
                           precision, MAX_LOGPROBS if wants_logprobs else 0)
        if self._channel is not None:  # multi-host: every process makes the same call
            self._channel.publish(call)
        sample, prompt = self._device_call(call)
        return self._unpack(chunks, sample, prompt)

    def _device_call(self, call: "_DeviceCall"):
        """The compiled forward, then the compiled sampler: (SampleResult, prompt logprobs or None)."""
        buffer, layout = pack(call.inputs)
        logits_bv, hidden_bd, sampling, prompt, self.kv = self._call_step(
            layout, call.with_prompt_logprobs, call.precision, buffer)
        sample = sample_tokens(logits_bv, sampling, num_top_logprobs=call.num_top_logprobs,
                               with_logprobs=call.num_top_logprobs > 0, precision=call.precision,
                               hidden_bd=hidden_bd, head=self._head, head_is_vd=self._head_is_vd)
        return sample, prompt

    def _call_step(self, layout: Layout, with_prompt_logprobs: bool, precision: Precision, buffer):
        """The compiled forward at `precision`: the program `warmup` compiled ahead for these shapes,
        else jit's (compiled on first use); STANDARD's over the plain weights, HIGH's and ULTRA's over
        the sliced ones too."""
        step, sliced = self._step_at(precision)
        compiled = self._compiled.get((layout, with_prompt_logprobs, precision))
        if compiled is not None:
            return compiled(self.state, sliced, self.kv, buffer)
        return step(layout, with_prompt_logprobs, precision, self.attention[precision], self.state, sliced,
                    self.kv, buffer)

    def _step_at(self, precision: Precision):
        """The jitted step for `precision` and the sliced weights it takes (None at STANDARD)."""
        if precision is Precision.STANDARD:
            return self._step, None
        if self._sliced is None:
            # The slices' dots run as int8 × int8 → int32 (the same bits as float32's): what GPUs'
            # tensor cores run fastest, and on XLA:CPU (VNNI) too — SmolLM2's gate projection under
            # HIGH, 0.97 ms at batch 1 and 3.7 ms at 16, against 2.1 and 5.9 ms for float32 dots.
            self._sliced = jax.jit(lambda state: nnx.merge(self.graphdef, state).slice_weights(
                integer_dots=True))(self.state)
            self._sliced_step = _compiled_step(self.graphdef, self.mesh, self._state_shardings, self._kv_sharding,
                                               jax.tree.map(lambda a: a.sharding, self._sliced))
        return self._sliced_step, self._sliced

    # -- multi-host (engine.distributed) -----------------------------------------------
    def follow(self) -> None:
        """A process other than 0: make every call process 0 makes, until it stops."""
        self._channel.follow(lambda call: jax.block_until_ready(self._device_call(call)))

    def close(self) -> None:
        """Process 0: let the other processes' `follow` return."""
        if self._channel is not None and self._channel.is_leader:
            self._channel.stop()
            self._channel = None

    def _sampling_row(self, chunk: ScheduledChunk) -> SamplingRow:
        seq = chunk.seq
        # EOS and stop token ids are banned until min_tokens are out.
        banned = seq.params.banned_token_ids(
            num_output_tokens=len(seq.output_ids),
            eos_token_ids=() if self.eos_token_id is None else (self.eos_token_id,))
        return SamplingRow(params=seq.params, seed=seq.seed, choice=seq.choice, position=seq.num_tokens,
                           prompt_ids=seq.prompt_ids, output_ids=seq.output_ids, banned_ids=banned)

    def _unpack(self, chunks, sample: SampleResult, prompt) -> dict[int, StepOutput]:
        sample = jax.device_get(sample)
        prompt = jax.device_get(prompt) if prompt is not None else None
        results = {}
        for row, chunk in enumerate(chunks):
            params = chunk.seq.params
            token = logprobs = prompt_logprobs = is_stable = None
            if chunk.samples:
                token = int(sample.token_ids_b[row])
                is_stable = bool(sample.margin_b[row] > 2 * sample.error_bound_b[row])
                if params.logprobs is not None:
                    k = params.logprobs
                    logprobs = TokenLogprobs(token, float(sample.logprob_b[row]), tuple(
                        (int(i), float(lp)) for i, lp in
                        zip(sample.top_ids_bk[row, :k], sample.top_logprobs_bk[row, :k])))
            if prompt is not None and params.prompt_logprobs is not None:
                next_lp, top_ids, top_lps = prompt
                k = params.prompt_logprobs
                # Position i predicts token i + 1; the chunk's last position
                # predicts a prompt token only when the prompt goes on.
                num_predicted = min(chunk.num_tokens, len(chunk.seq.prompt_ids) - 1 - chunk.start)
                prompt_logprobs = [
                    TokenLogprobs(chunk.seq.prompt_ids[chunk.start + i + 1], float(next_lp[row, i]),
                                  tuple((int(j), float(lp)) for j, lp in zip(top_ids[row, i, :k], top_lps[row, i, :k])))
                    for i in range(max(num_predicted, 0))]
            if chunk.samples or prompt_logprobs is not None:
                results[chunk.seq.seq_id] = StepOutput(token, logprobs, prompt_logprobs, is_stable)
        return results

    # -- compile ahead -----------------------------------------------------------
    def warmup(self, precision: Precision = Precision.STANDARD, *, num_threads: int | None = None,
               progress: Callable[[int], CompileProgress] | None = None) -> int:
        """Compile every bucketed program (greedy, no logprobs) at `precision`; returns how many
        forward programs there are. `progress(total)` gets told of each program compiled.

        The forward programs compile from shapes (`lower(...).compile()` on the
        weights', the cache's and a ShapeDtypeStruct's avals: nothing runs), on
        `num_threads` threads at once (default: one per CPU), into a table
        `_call_step` dispatches to. The sampler's programs (one per B) then
        compile on one real step each. On 2 cores the threads gained nothing
        (XLA:CPU's codegen already keeps both busy: 77 programs in 37 s of
        compiling on 1 thread, 39 s on 2), nor did compiling from shapes over
        running all-padding batches (55 s either way): they are for hosts with
        more cores, and for devices whose memory a dummy batch would touch.
        """
        buffers = {}
        for b, t, p in self.bucket_shapes(precision):
            buffer, layout = self._warmup_inputs(b, t, p)
            buffers[layout] = buffer
        step, sliced = self._step_at(precision)
        everywhere = sharding.replicated(self.mesh)
        missing = [layout for layout in buffers if (layout, False, precision) not in self._compiled]
        sampler_rows = sorted({self._sampler_rows(b) for b in powers_of_two(bucket(self.max_num_seqs))})
        counter = progress(len(missing) + len(sampler_rows)) if progress is not None else None

        def compile_one(program):
            compiled = program.compile()
            if counter is not None:
                counter.advance()
            return compiled

        # Tracing and lowering stay on this thread (JAX's tracing is not ours to run concurrently);
        # XLA's compiles, the bulk of the time, run on the pool.
        lowered = [step.lower(layout, False, precision, self.attention[precision], self.state, sliced, self.kv,
                              jax.ShapeDtypeStruct(buffers[layout].shape, buffers[layout].dtype, sharding=everywhere))
                   for layout in missing]
        with concurrent.futures.ThreadPoolExecutor(num_threads or os.cpu_count() or 1) as pool:
            for layout, compiled in zip(missing, pool.map(compile_one, lowered)):
                self._compiled[(layout, False, precision)] = compiled
        for b in sampler_rows:
            buffer, layout = self._warmup_inputs(b, 1, self._pages_bucket(1, precision))
            logits_bv, hidden_bd, sampling, _, self.kv = self._call_step(layout, False, precision, buffer)
            jax.block_until_ready(sample_tokens(logits_bv, sampling, num_top_logprobs=0, with_logprobs=False,
                                               precision=precision, hidden_bd=hidden_bd, head=self._head,
                                               head_is_vd=self._head_is_vd))
            if counter is not None:
                counter.advance()
        return len(buffers)

    def _warmup_inputs(self, b: int, t: int, p: int):
        """A packed all-padding input of shape (B, T, P): nothing it writes reaches the cache."""
        arrays = pack_sampling([SamplingRow(params=_WARMUP_PARAMS, seed=0, position=0)],
                               vocab_size=self.config.vocab_size, batch_size=self._sampler_rows(b))
        zeros = np.zeros((b, t), np.int32)
        return pack((zeros, zeros, np.zeros((b, p), np.int32), np.zeros((b, t), bool), arrays, zeros))


@dataclasses.dataclass(frozen=True, slots=True)
class _DeviceCall:
    """A step's host inputs (numpy, before packing) and static choices: all a process needs
    to make the same compiled calls."""

    inputs: tuple
    with_prompt_logprobs: bool
    precision: Precision
    num_top_logprobs: int


def _precision(chunk: ScheduledChunk) -> Precision:
    return chunk.seq.params.precision or Precision.STANDARD


def _step(graphdef, mesh: Mesh, layout: Layout, with_prompt_logprobs: bool, precision: Precision,
          attention_backend: AttentionBackend, state, sliced, kv, buffer_n):
    """Forward over the paged cache: logits `[B, V]` at each row's last valid
    token and its hidden state (for the sampler's stability check), the
    sampling arrays (unpacked here, so they cross to the device in the one
    buffer), prompt logprobs when asked, the updated cache."""
    token_ids_bt, positions_bt, block_tables_bp, is_valid_bt, sampling, next_ids_bt = unpack(buffer_n, layout)
    if token_ids_bt.shape[0] % mesh.shape[sharding.DATA] == 0:  # rows split over data-parallel replicas
        rows = NamedSharding(mesh, PartitionSpec(sharding.RULES["batch"]))
        token_ids_bt, positions_bt, block_tables_bp, is_valid_bt, next_ids_bt = (
            jax.lax.with_sharding_constraint(a, rows)
            for a in (token_ids_bt, positions_bt, block_tables_bp, is_valid_bt, next_ids_bt))
    model = nnx.merge(graphdef, state)
    hidden_btd, kv = model(token_ids_bt, positions_bt, kv, block_tables_bp, is_valid_bt, precision=precision,
                           attention_backend=attention_backend, sliced=sliced)
    last_b = jnp.maximum(jnp.sum(is_valid_bt, axis=1) - 1, 0)
    # Under ULTRA the hidden states are a double-word (hi, lo): pick from both.
    hidden_bd = jax.tree.map(lambda h: jnp.take_along_axis(h, last_b[:, None, None], axis=1)[:, 0], hidden_btd)
    prompt = None
    if with_prompt_logprobs:
        logprobs_btv = numerics.log_softmax(model.logits(hidden_btd, precision=precision, sliced=sliced),
                                            precision=precision)
        next_logprob_bt = jnp.take_along_axis(logprobs_btv, next_ids_bt[..., None], axis=-1)[..., 0]
        top_logprobs_btk, top_ids_btk = jax.lax.top_k(logprobs_btv, MAX_LOGPROBS)
        prompt = (next_logprob_bt, top_ids_btk, top_logprobs_btk)
    # The sampler's programs take rows in powers of four: pad to the sampling arrays' rows.
    pad = sampling.temperature_b.shape[0] - token_ids_bt.shape[0]
    logits_bv, hidden_bd = jax.tree.map(lambda a: jnp.pad(a, ((0, pad), (0, 0))),
                                        (model.logits(hidden_bd, precision=precision, sliced=sliced), hidden_bd))
    return logits_bv, hidden_bd, sampling, prompt, kv


_COMPILED_STEPS: dict = {}


def _compiled_step(graphdef, mesh: Mesh, state_shardings, kv_sharding, sliced_shardings=None):
    """`_step` compiled for one architecture on one mesh, with explicit shardings: weights (and
    their slices, for HIGH and ULTRA) and cache as placed, the packed input buffer and every output
    but the cache replicated.

    The graph definition and the input layout are static (hashable): every
    runner of the same architecture and mesh shares compiled programs, and
    weights stay arguments. All other inputs arrive packed in one buffer
    (one transfer). The cache is donated, so XLA updates it in place.
    The weights' shardings follow from the architecture and the mesh
    (model.sharding), so they need no place in the key.
    """
    sliced_key = None if sliced_shardings is None else (
        jax.tree.structure(sliced_shardings), tuple(jax.tree.leaves(sliced_shardings)))
    key = (graphdef, mesh, kv_sharding, sliced_key)
    if key not in _COMPILED_STEPS:
        everywhere = sharding.replicated(mesh)
        _COMPILED_STEPS[key] = jax.jit(
            functools.partial(_step, graphdef, mesh), static_argnums=(0, 1, 2, 3), donate_argnums=(6,),
            in_shardings=(state_shardings, sliced_shardings, kv_sharding, everywhere),
            out_shardings=(everywhere, everywhere, everywhere, everywhere, kv_sharding))
    return _COMPILED_STEPS[key]
