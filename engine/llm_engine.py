"""The engine core: requests in, a step at a time, outputs out.

`LLMEngine.step()` asks the scheduler for a batch, has the batch runner
compute it, then does the host-side bookkeeping: appends sampled tokens,
detokenises, checks stop conditions, frees finished sequences. Synchronous
and single-threaded; `LLM` (scripts) and `AsyncEngine` (the server) drive it.

A request with n > 1 choices starts as one sequence; its siblings join once
the prompt is computed, and find the prompt's full blocks in the prefix
cache instead of computing them again.
"""

from __future__ import annotations

import dataclasses
import random
import time

import jax
import numpy as np
from flax import nnx

from checkpoints.loader import LoadedModel, model_name
from engine.batch_runner import BatchRunner
from engine.block_manager import BlockManager
from engine import memory
from engine.compilation_cache import enable_compilation_cache
from engine.precision_share import PrecisionShare
from engine.outputs import (CompletionOutput, EngineStats, ModelInfo, RejectedField, RequestOutput,
                            RequestRejected, Stability)
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import FinishReason, Sequence
from engine.startup import StartupPhases
from engine.text_output import TextOutput
from model import attention, quantization, sharding
from model.kv_cache import KVCache
from model.llama import LlamaForCausalLM
from model.numerics import Precision
from model.quantization import Quantization

_EXPENSIVE_LEVELS = frozenset({Precision.HIGH, Precision.ULTRA})  # deferred by PrecisionShare


@dataclasses.dataclass(frozen=True, slots=True)
class EngineConfig:
    """Engine limits; CLI flags map onto these one to one."""

    max_model_len: int | None = None  # default: the model's, at most 8192
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # token budget of one step
    block_size: int = 16
    # KV cache size per device: bytes (int), a fraction of the device memory the
    # weights leave (float in (0, 1]), or None for 0.9 of it (2 GiB on CPU).
    kv_cache_memory: int | float | None = None
    # Of the weights and activations, and of the KV cache: auto (bfloat16 on a GPU,
    # float32 elsewhere), float32 or bfloat16. Norm statistics, RoPE, softmax and
    # logits are float32 whatever these are.
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    enable_prefix_caching: bool = True
    # The numerics level of requests that do not choose one (model.numerics.Precision's names).
    precision: str = "standard"
    # The device mesh (model.sharding): tensor-parallel shards × data-parallel replicas.
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    # Attention (model.attention): auto (the kernels on a GPU at standard precision, the gather
    # path elsewhere), xla (always the gather path) or pallas (the kernels; interpreted off a GPU).
    attention_backend: str = "auto"
    # Weight quantisation (model.quantization): none, int8 (per-channel int8 matrices, embedding
    # and LM head; norms, biases, the KV cache and activations keep `dtype`) or int8-dynamic
    # (also the activations per token where that is faster).
    quantization: str = "none"
    warmup: bool = False  # compile every bucketed program at start (at `precision`)
    # The most of the engine's time HIGH and ULTRA calls take while STANDARD work waits
    # (engine.precision_share); 1: no limit.
    high_precision_share: float = 0.25
    compilation_cache_dir: str | None = None  # JAX's persistent cache; None: off

    def mesh(self):
        """The device mesh these sizes ask for (model.sharding.make_mesh)."""
        return sharding.make_mesh(self.tensor_parallel_size, self.data_parallel_size)

    def weight_dtype(self):
        """The weights' dtype on this machine's devices (what loaders load with)."""
        return memory.resolve_dtype(self.dtype, jax.devices()[0].platform)

    def cache_dtype(self):
        """The KV cache's dtype on this machine's devices: the pool is sized and allocated with it."""
        return memory.resolve_dtype(self.kv_cache_dtype, jax.devices()[0].platform)

    def __post_init__(self):
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if isinstance(self.kv_cache_memory, float) and not 0 < self.kv_cache_memory <= 1:
            raise ValueError(f"a kv_cache_memory fraction must be in (0, 1], got {self.kv_cache_memory}")
        SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens)  # validates both
        if self.tensor_parallel_size < 1 or self.data_parallel_size < 1:
            raise ValueError("tensor_parallel_size and data_parallel_size must be at least 1")
        if self.precision not in {p.value for p in Precision}:
            raise ValueError(f"precision must be one of {[p.value for p in Precision]}, got {self.precision!r}")
        for name in (self.dtype, self.kv_cache_dtype):
            memory.resolve_dtype(name, "cpu")  # validates
        if self.quantization not in quantization.CHOICES:
            raise ValueError(f"quantization must be one of {quantization.CHOICES}, got {self.quantization!r}")
        if not 0 < self.high_precision_share <= 1:
            raise ValueError(f"high_precision_share must be in (0, 1], got {self.high_precision_share}")
        if self.attention_backend not in attention.CHOICES:
            raise ValueError(f"attention_backend must be one of {attention.CHOICES}, got {self.attention_backend!r}")


@dataclasses.dataclass(slots=True)
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float
    seqs: list[Sequence]
    pending: list[Sequence]  # siblings waiting for the prompt to be computed
    texts: dict[int, TextOutput]
    num_cached_tokens: int = 0


class LLMEngine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig = EngineConfig(), *,
                 startup: StartupPhases | None = None):
        """`startup` times the phases this does (place, compile) with the caller's others
        (engine.startup); by default a fresh one."""
        self.startup = startup or StartupPhases(model_name(loaded))
        with self.startup.phase("place"):
            self._place(loaded, config)
        if config.warmup:
            with self.startup.phase("compile"):
                self.runner.warmup(Precision(config.precision), progress=self.startup.compile_progress)

    def _place(self, loaded: LoadedModel, config: EngineConfig) -> None:
        """The weights in the engine's dtype on the mesh, the KV pool beside them, the scheduler."""
        if config.compilation_cache_dir is not None:
            enable_compilation_cache(config.compilation_cache_dir)
        self.tokenizer = loaded.tokenizer
        cfg = loaded.config
        self.config = config
        self.max_model_len = config.max_model_len or min(cfg.max_position_embeddings, 8192)
        self.eos_token_id = self.tokenizer.eos_token_id
        # What callers check requests against (serving reads these, never the config).
        self.info = ModelInfo(tokenizer=self.tokenizer, vocab_size=cfg.vocab_size, max_model_len=self.max_model_len)
        self.mesh = config.mesh()
        model = _with_dtype(loaded.model, config.weight_dtype()).quantized(Quantization(config.quantization))
        sharding.shard_model(model, self.mesh)  # first: the KV budget is what the weights leave
        # What this engine runs (the embedder reads it too); the caller's float copy can go.
        self.loaded = loaded = dataclasses.replace(loaded, model=model)
        self.weight_bytes = memory.tree_bytes(nnx.state(model))
        self.kv_dtype = config.cache_dtype()
        # The budget is per device; a device holds its share of the KV heads.
        kv_heads_per_device = cfg.num_kv_heads // (
            config.tensor_parallel_size if sharding.kv_heads_axis(cfg, self.mesh) else 1)
        bytes_per_block = KVCache.bytes_per_page(cfg, page_size=config.block_size, dtype=self.kv_dtype,
                                                 num_kv_heads=kv_heads_per_device)
        self.num_blocks = max(1, memory.kv_budget(config.kv_cache_memory, self.mesh) // bytes_per_block)
        if jax.process_count() > 1:  # every process must build the very same cache: process 0's size
            from jax.experimental import multihost_utils

            self.num_blocks = int(multihost_utils.broadcast_one_to_all(np.int64(self.num_blocks)))
        # No more than every running sequence at full length needs.
        self.num_blocks = min(self.num_blocks,
                              config.max_num_seqs * -(-self.max_model_len // config.block_size))
        self.block_manager = BlockManager(num_blocks=self.num_blocks, block_size=config.block_size,
                                          enable_prefix_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens),
                                   self.block_manager)
        self.precision_share = PrecisionShare(config.high_precision_share)
        self.runner = BatchRunner(model, num_blocks=self.num_blocks, block_size=config.block_size,
                                  max_num_seqs=config.max_num_seqs,
                                  max_num_batched_tokens=config.max_num_batched_tokens,
                                  max_model_len=self.max_model_len, eos_token_id=self.eos_token_id,
                                  mesh=self.mesh, kv_dtype=self.kv_dtype,
                                  attention_backend=config.attention_backend)
        self.kv_cache_bytes = memory.tree_bytes(self.runner.kv)
        self._requests: dict[str, _Request] = {}
        self.num_prompt_tokens = 0  # computed, over the engine's life
        self.num_generation_tokens = 0

    # -- requests --------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams, *,
                    arrival_time: float | None = None) -> None:
        """Queue a request. Raises RequestRejected (a ValueError) for one it cannot serve."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.check_request(prompt_ids, params)
        if params.precision is None:
            params = dataclasses.replace(params, precision=self.config.precision)
        arrival_time = time.time() if arrival_time is None else arrival_time
        seed = params.seed if params.seed is not None else random.getrandbits(31)
        seqs = [Sequence(request_id=request_id, choice=i, prompt_ids=list(prompt_ids), params=params,
                         seed=seed, arrival_time=arrival_time,
                         prompt_logprobs=[] if params.prompt_logprobs is not None and i == 0 else None)
                for i in range(params.n)]
        texts = {s.seq_id: TextOutput(self.tokenizer, s.prompt_ids, params) for s in seqs}
        self._requests[request_id] = _Request(request_id, list(prompt_ids), params, arrival_time,
                                              seqs, seqs[1:], texts)
        self.scheduler.add(seqs[0])

    def check_request(self, prompt_ids: list[int], params: SamplingParams, *,
                      max_tokens_name: str = "max_tokens") -> None:
        """Raise RequestRejected unless the engine can serve this prompt with these params
        (what `add_request` checks, for callers that must answer before queueing).

        The one contract of what the engine accepts: token ids in the
        vocabulary, prompt plus max_tokens within max_model_len, the whole
        request within the KV pool. `max_tokens_name` is what the caller calls
        max_tokens, for the message.
        """
        vocab_size = self.loaded.config.vocab_size
        if not prompt_ids:
            raise RequestRejected("the prompt is empty", field=RejectedField.PROMPT)
        if any(not 0 <= t < vocab_size for t in prompt_ids):
            raise RequestRejected(f"prompt token ids must be in [0, {vocab_size})", field=RejectedField.PROMPT)
        for field, ids in ((RejectedField.LOGIT_BIAS, [t for t, _ in params.logit_bias or ()]),
                           (RejectedField.STOP_TOKEN_IDS, params.stop_token_ids)):
            if any(not 0 <= t < vocab_size for t in ids):
                raise RequestRejected(f"{field.value} token ids must be in [0, {vocab_size})", field=field)
        context = (f"this model's maximum context length is {self.max_model_len} tokens; the prompt has "
                   f"{len(prompt_ids)}")
        if len(prompt_ids) >= self.max_model_len:
            raise RequestRejected(context, field=RejectedField.PROMPT, is_context_length=True)
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise RequestRejected(f"{context} and {max_tokens_name} asks for {params.max_tokens} more",
                                  field=RejectedField.MAX_TOKENS, is_context_length=True)
        if -(-(len(prompt_ids) + params.max_tokens) // self.config.block_size) > self.num_blocks:
            raise RequestRejected(f"the request needs more KV cache than the whole pool "
                                  f"({self.num_blocks * self.config.block_size} tokens)",
                                  field=RejectedField.PROMPT)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now; its KV blocks are freed at once."""
        request = self._requests.pop(request_id, None)
        if request is not None:
            self.scheduler.abort(s for s in request.seqs if s not in request.pending)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def stats(self) -> EngineStats:
        blocks = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=blocks.usage, prefix_cache_queries=blocks.prefix_cache_queries,
            prefix_cache_hits=blocks.prefix_cache_hits, num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens, num_preemptions=self.scheduler.num_preemptions,
            num_kv_blocks=self.num_blocks, kv_cache_bytes=self.kv_cache_bytes, weight_bytes=self.weight_bytes)

    # -- one step ------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one batch; return the requests it advanced (finished ones for the last time)."""
        levels = {s.params.precision for s in (*self.scheduler.running, *self.scheduler.waiting)}
        has_cheap, has_expensive = Precision.STANDARD in levels, bool(levels - {Precision.STANDARD})
        deferred = frozenset()
        if self.precision_share.defers_expensive(has_cheap_work=has_cheap, has_expensive_work=has_expensive):
            deferred = _EXPENSIVE_LEVELS
        scheduled = self.scheduler.schedule(deferred=deferred)
        if scheduled.is_empty and deferred:  # the STANDARD work cannot run now (no free blocks): no deferral
            scheduled = self.scheduler.schedule()
        for seq in scheduled.preempted:
            if seq.prompt_logprobs is not None:
                seq.prompt_logprobs.clear()  # recomputed with the prompt
        if scheduled.is_empty:
            return []
        chunks = scheduled.decodes + scheduled.prefills
        tables = {c.seq.seq_id: self.block_manager.block_table(c.seq.seq_id) for c in chunks}
        results = self.runner.execute(scheduled, tables)
        seconds = self.runner.last_step_seconds
        self.precision_share.record(
            cheap_seconds=seconds.get(Precision.STANDARD, 0.0),
            expensive_seconds=sum(t for level, t in seconds.items() if level is not Precision.STANDARD),
            has_cheap_work=has_cheap, has_expensive_work=has_expensive)
        now = time.time()
        touched: dict[str, _Request] = {}
        for chunk in chunks:
            seq = chunk.seq
            request = self._requests.get(seq.request_id)
            self.scheduler.commit(chunk)
            if request is None:
                continue
            touched[request.request_id] = request
            self.num_prompt_tokens += max(0, min(chunk.start + chunk.num_tokens, len(seq.prompt_ids))
                                          - chunk.start)
            result = results.get(seq.seq_id)
            if result is not None and result.prompt_logprobs is not None and seq.prompt_logprobs is not None:
                seq.prompt_logprobs.extend(result.prompt_logprobs)
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
                if seq.choice == 0:
                    request.num_cached_tokens = chunk.start  # prompt tokens found in the prefix cache
            if not chunk.samples:
                continue
            if seq.choice == 0 and request.pending:
                for sibling in request.pending:
                    self.scheduler.add(sibling)
                request.pending = []
            self._append_token(request, seq, result, now)
        outputs = [self._output(r) for r in touched.values()]
        for output in outputs:
            if output.finished:
                del self._requests[output.request_id]
        return outputs

    def _append_token(self, request: _Request, seq: Sequence, result, now: float) -> None:
        token = result.token_id
        params = seq.params
        seq.output_ids.append(token)
        if result.logprobs is not None:
            seq.output_logprobs.append(result.logprobs)
        if result.is_stable:
            seq.num_stable_tokens += 1
        elif seq.first_fragile_index is None:
            seq.first_fragile_index = len(seq.output_ids) - 1
        seq.first_token_time = seq.first_token_time or now
        self.num_generation_tokens += 1
        text = request.texts[seq.seq_id]
        past_min_tokens = len(seq.output_ids) >= params.min_tokens
        stop_string = text.append(token, check_stops=past_min_tokens)
        reason, stop_reason = None, None
        if past_min_tokens:
            if token == self.eos_token_id and not params.ignore_eos:
                reason = FinishReason.STOP
            elif token in params.stop_token_ids:
                reason, stop_reason = FinishReason.STOP, token
            elif stop_string is not None:
                reason, stop_reason = FinishReason.STOP, stop_string
        if reason is None and (len(seq.output_ids) >= params.max_tokens
                               or seq.num_tokens >= self.max_model_len):
            reason = FinishReason.LENGTH
        if reason is not None:
            text.finish()
            seq.stop_reason = stop_reason
            self.scheduler.finish(seq, reason)

    def _output(self, request: _Request) -> RequestOutput:
        first = request.seqs[0]
        outputs = [
            CompletionOutput(
                index=s.choice, text=request.texts[s.seq_id].stream_text, token_ids=list(s.output_ids),
                logprobs=list(s.output_logprobs) if s.params.logprobs is not None else None,
                finish_reason=s.finish_reason.value if s.finish_reason else None,
                stop_reason=s.stop_reason, stability=_stability(s))
            for s in request.seqs]
        times = [s.first_token_time for s in request.seqs if s.first_token_time]
        return RequestOutput(
            request_id=request.request_id, prompt_ids=request.prompt_ids,
            # A copy: a preempted sequence recomputes (clears and refills) its own list.
            prompt_logprobs=list(first.prompt_logprobs) if first.prompt_logprobs is not None else None,
            outputs=outputs,
            finished=all(s.is_finished for s in request.seqs),
            arrival_time=request.arrival_time, first_scheduled_time=first.first_scheduled_time,
            first_token_time=min(times) if times else None,
            num_cached_tokens=request.num_cached_tokens)


def _stability(seq: Sequence) -> Stability | None:
    if not seq.output_ids:
        return None
    return Stability(score=seq.num_stable_tokens / len(seq.output_ids), first_fragile_token=seq.first_fragile_index)


def _with_dtype(model: LlamaForCausalLM, dtype) -> LlamaForCausalLM:
    """`model` with every weight in `dtype`: itself when they already are (loaders load in the
    engine's dtype), else a copy, so that a model shared with other engines is left as it is."""
    graphdef, state = nnx.split(model)
    if all(a.dtype == dtype for a in jax.tree.leaves(state)):
        return model
    return nnx.merge(graphdef, jax.tree.map(lambda a: a.astype(dtype), state))
