"""The on-device sampler.

Host to device, in two steps:

- `SamplingRow` → `pack_sampling` → `SamplingArrays`: each step the engine
  describes every row of its batch (parameters, resolved seed, choice index,
  position, token history, banned ids); the packer turns them into per-row
  numpy arrays whose widths are powers of two, so few programs compile.
- `sample_tokens`: one jitted function of (logits, arrays) that processes the
  logits in vLLM's order (bias, bans, penalties, temperature, top-k, top-p,
  min-p) and draws one token per row by Gumbel-max.

Reproducibility (shared/DESIGN.md, decision 4): the key of a draw is derived
from the row's seed, choice index and the position of the token being
sampled, never from the row's place in the batch, and every operation is
row-wise, so a seeded request samples the same tokens whatever else runs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from engine.buckets import bucket
from engine.sampling import NUM_SEEDS, SamplingParams, checked_integer
from model import numerics


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SamplingRow:
    """One batch row's sampling inputs for one step (host side).

    `seed` is resolved: the engine picks one for an unseeded request, once.
    `prompt_ids` / `output_ids` are read only when `params.needs_history`.
    """

    params: SamplingParams
    seed: int
    position: int  # position of the token being sampled
    choice: int = 0  # which of the request's n choices this row is
    prompt_ids: Sequence[int] = ()
    output_ids: Sequence[int] = ()
    banned_ids: Sequence[int] = ()

    def __post_init__(self):
        checked_integer("seed", self.seed, lambda x: 0 <= x < NUM_SEEDS, "in [0, 2**32)")
        checked_integer("position", self.position, lambda x: x >= 0, ">= 0")
        checked_integer("choice", self.choice, lambda x: 0 <= x < self.params.n,
                 f"in [0, n={self.params.n})")


class SamplingArrays(NamedTuple):
    """Per-row sampling inputs of a batch of B rows, as the device reads them."""

    temperature_b: jax.Array  # f32; 0 = greedy
    top_p_b: jax.Array  # f32; 1 = no limit
    top_k_b: jax.Array  # int32; 0 = no limit
    min_p_b: jax.Array  # f32; 0 = no limit
    presence_b: jax.Array  # f32
    frequency_b: jax.Array  # f32
    repetition_b: jax.Array  # f32; 1 = none
    seed_b: jax.Array  # uint32
    choice_b: jax.Array  # int32
    position_b: jax.Array  # int32
    history_bl: jax.Array  # int32 [B, L]: prompt then output ids, valid where history_mask_bl
    history_mask_bl: jax.Array  # bool [B, L]
    is_output_bl: jax.Array  # bool [B, L]: a generated token, not a prompt token
    bias_ids_bk: jax.Array  # int32 [B, K]; padding is id 0 with bias 0
    bias_values_bk: jax.Array  # f32 [B, K]
    banned_ids_bs: jax.Array  # int32 [B, S], valid where banned_mask_bs
    banned_mask_bs: jax.Array  # bool [B, S]


class SampleResult(NamedTuple):
    token_ids_b: jax.Array  # int32
    logprob_b: jax.Array  # f32: the token's log-prob under the raw model distribution
    top_ids_bk: jax.Array  # int32 [B, num_top_logprobs], most likely first
    top_logprobs_bk: jax.Array  # f32 [B, num_top_logprobs]
    # The decision's stability: the margin between the two best decision scores, and a bound on
    # how far rounding in the LM head can move them (see `decision_stability`).
    margin_b: jax.Array  # f32
    error_bound_b: jax.Array  # f32


def _checked_ids(name: str, row: int, ids: Iterable[int], vocab_size: int) -> np.ndarray:
    ids_n = np.asarray(ids, np.int64).reshape(-1)
    if ids_n.size and (ids_n.min() < 0 or ids_n.max() >= vocab_size):
        raise ValueError(f"row {row}: {name} must be token ids in [0, {vocab_size}), "
                         f"got {ids_n.min()}..{ids_n.max()}")
    return ids_n.astype(np.int32)


def pack_sampling(rows: Sequence[SamplingRow], *, vocab_size: int,
                  batch_size: int | None = None) -> SamplingArrays:
    """Numpy `SamplingArrays` for `rows`, padded to `batch_size` rows (default: len(rows)).

    Padding rows are greedy with nothing banned or biased. Rows whose params
    need no history contribute none, so when no row uses a penalty L is 1 and
    fully masked. L, K and S are powers of two.
    """
    b = len(rows) if batch_size is None else batch_size
    if b < max(len(rows), 1):
        raise ValueError(f"batch_size must be at least the number of rows ({len(rows)}) and 1, got {b}")
    histories, biases, bans = [], [], []
    for i, row in enumerate(rows):
        p = row.params
        prompt = row.prompt_ids if p.repetition_penalty != 1 else ()  # only it reads the prompt
        output = row.output_ids if p.needs_history else ()
        histories.append((_checked_ids("prompt_ids", i, prompt, vocab_size),
                          _checked_ids("output_ids", i, output, vocab_size)))
        bias = p.logit_bias or ()
        biases.append((_checked_ids("logit_bias", i, [t for t, _ in bias], vocab_size),
                       np.asarray([v for _, v in bias], np.float32)))
        bans.append(_checked_ids("banned_ids", i, row.banned_ids, vocab_size))
    lengths = [len(h[0]) + len(h[1]) for h in histories]
    num_history = bucket(max(lengths, default=1))
    num_bias = bucket(max((len(ids) for ids, _ in biases), default=1))
    num_banned = bucket(max((len(ids) for ids in bans), default=1))

    a = SamplingArrays(
        temperature_b=np.zeros(b, np.float32), top_p_b=np.ones(b, np.float32),
        top_k_b=np.zeros(b, np.int32), min_p_b=np.zeros(b, np.float32),
        presence_b=np.zeros(b, np.float32), frequency_b=np.zeros(b, np.float32),
        repetition_b=np.ones(b, np.float32), seed_b=np.zeros(b, np.uint32),
        choice_b=np.zeros(b, np.int32), position_b=np.zeros(b, np.int32),
        history_bl=np.zeros((b, num_history), np.int32),
        history_mask_bl=np.zeros((b, num_history), bool),
        is_output_bl=np.zeros((b, num_history), bool),
        bias_ids_bk=np.zeros((b, num_bias), np.int32), bias_values_bk=np.zeros((b, num_bias), np.float32),
        banned_ids_bs=np.zeros((b, num_banned), np.int32),
        banned_mask_bs=np.zeros((b, num_banned), bool))
    for i, row in enumerate(rows):
        p = row.params
        if not p.is_greedy:  # greedy rows keep the neutral values, so they never force a sort
            a.temperature_b[i], a.top_p_b[i], a.min_p_b[i] = p.temperature, p.top_p, p.min_p
            a.top_k_b[i] = p.top_k if p.top_k is not None and p.top_k < vocab_size else 0
        a.presence_b[i], a.frequency_b[i] = p.presence_penalty, p.frequency_penalty
        a.repetition_b[i] = p.repetition_penalty
        a.seed_b[i], a.choice_b[i], a.position_b[i] = row.seed, row.choice, row.position
        prompt, output = histories[i]
        a.history_bl[i, :lengths[i]] = np.concatenate([prompt, output])
        a.history_mask_bl[i, :lengths[i]] = True
        a.is_output_bl[i, len(prompt):lengths[i]] = True
        a.bias_ids_bk[i, :len(biases[i][0])], a.bias_values_bk[i, :len(biases[i][1])] = biases[i]
        a.banned_ids_bs[i, :len(bans[i])] = bans[i]
        a.banned_mask_bs[i, :len(bans[i])] = True
    return a


def _apply_penalties(logits_bv: jax.Array, a: SamplingArrays) -> jax.Array:
    """Repetition (prompt and output tokens), then frequency and presence (output tokens)."""
    b, v = logits_bv.shape
    rows_bl = jnp.broadcast_to(jnp.arange(b)[:, None], a.history_bl.shape)
    # Invalid entries scatter to the out-of-range id v, which mode="drop" discards.
    seen_ids_bl = jnp.where(a.history_mask_bl, a.history_bl, v)
    output_ids_bl = jnp.where(a.history_mask_bl & a.is_output_bl, a.history_bl, v)
    is_seen_bv = jnp.zeros((b, v), bool).at[rows_bl, seen_ids_bl].set(True, mode="drop")
    count_bv = jnp.zeros((b, v), jnp.int32).at[rows_bl, output_ids_bl].add(1, mode="drop")
    penalty_b1 = a.repetition_b[:, None]
    logits_bv = jnp.where(is_seen_bv, jnp.where(logits_bv > 0, logits_bv / penalty_b1,
                                                logits_bv * penalty_b1), logits_bv)
    logits_bv = logits_bv - a.frequency_b[:, None] * count_bv.astype(jnp.float32)
    return logits_bv - a.presence_b[:, None] * (count_bv > 0).astype(jnp.float32)


# Top-k and top-p need the most likely tokens in order. Sorting the whole
# vocabulary costs ~600 ms per step for 64 rows × 49k on 2 CPU cores;
# lax.top_k of the first 512 costs ~20 ms, of the first 4096 ~70 ms. A row
# whose top-k is within the candidates, or whose nucleus closes within them,
# is decided exactly from them; rows the first tier cannot decide try the
# next, and only what no tier decides (a top-k beyond them, a very flat
# distribution) takes the full sort. Which tier decides a row depends on the
# row alone, so a row's result never depends on its batch.
TRUNCATION_TIERS = (512, 4096)


def _top_k_top_p(scaled_bv: jax.Array, top_k_b: jax.Array, top_p_b: jax.Array,
                 is_truncated_b: jax.Array) -> jax.Array:
    """Keep each truncated row's top_k tokens, then the smallest set of those
    reaching top_p (Holtzman et al., 2020) in the distribution renormalised
    over them; other rows come back unchanged."""
    v = scaled_bv.shape[-1]
    k_b = jnp.where(top_k_b > 0, jnp.minimum(top_k_b, v), v)
    out_bv, undecided_b = scaled_bv, is_truncated_b
    for num_candidates in TRUNCATION_TIERS:
        if num_candidates >= v:
            break
        tier_bv, fits_b = jax.lax.cond(
            jnp.any(undecided_b), functools.partial(_from_candidates, num_candidates=num_candidates),
            lambda x, *_: (x, jnp.zeros(x.shape[:1], bool)), scaled_bv, k_b, top_p_b)
        out_bv = jnp.where((undecided_b & fits_b)[:, None], tier_bv, out_bv)
        undecided_b = undecided_b & ~fits_b
    sorted_bv = jax.lax.cond(jnp.any(undecided_b), _sorted_top_k_top_p, lambda x, *_: x,
                             scaled_bv, k_b, top_p_b)
    return jnp.where(undecided_b[:, None], sorted_bv, out_bv)


def _from_candidates(scaled_bv: jax.Array, k_b: jax.Array, top_p_b: jax.Array, *,
                     num_candidates: int) -> tuple[jax.Array, jax.Array]:
    """Top-k and top-p from the `num_candidates` most likely tokens, and which rows they decide."""
    v, c = scaled_bv.shape[-1], num_candidates
    candidates_bc, _ = jax.lax.top_k(scaled_bv, c)  # most likely first
    in_top_k_bc = jnp.arange(c)[None] < k_b[:, None]
    # Top-p reads the distribution renormalised over the top-k: all among the
    # candidates when k <= c; with no top-k it is the whole vocabulary.
    log_norm_b1 = jnp.where((k_b <= c)[:, None],
                            numerics.logsumexp(candidates_bc, keepdims=True, where=in_top_k_bc),
                            numerics.logsumexp(scaled_bv, keepdims=True))
    probs_bc = jnp.where(in_top_k_bc, jnp.exp(candidates_bc - log_norm_b1), 0.0)
    num_kept_b, is_closed_b = _num_kept(probs_bc, in_top_k_bc, k_b, top_p_b)
    fits_b = (k_b <= c) | ((k_b >= v) & is_closed_b)
    threshold_b1 = jnp.take_along_axis(candidates_bc, (jnp.minimum(num_kept_b, c) - 1)[:, None], axis=-1)
    return jnp.where(scaled_bv >= threshold_b1, scaled_bv, -jnp.inf), fits_b


def _num_kept(probs_bn: jax.Array, in_top_k_bn: jax.Array, k_b: jax.Array,
              top_p_b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """How many of the N most likely tokens (probabilities `[B, N]`, most likely
    first) top-k and top-p keep, and whether the nucleus closed within them."""
    # A token is kept when the mass of strictly more likely tokens is below
    # top_p, so the most likely one always is. top_p 1 keeps all k, whatever
    # rounding does to the cumulative sum.
    mass_before_bn = jnp.cumsum(probs_bn, axis=-1) - probs_bn
    num_in_p_b = jnp.sum((mass_before_bn < top_p_b[:, None]) & in_top_k_bn, axis=-1)
    is_closed_b = (top_p_b < 1) & (num_in_p_b < probs_bn.shape[-1])
    return jnp.where(top_p_b < 1, num_in_p_b, k_b), is_closed_b


def _sorted_top_k_top_p(scaled_bv: jax.Array, k_b: jax.Array, top_p_b: jax.Array) -> jax.Array:
    """Top-k and top-p over the whole sorted vocabulary (the rows candidates cannot decide)."""
    v = scaled_bv.shape[-1]
    sorted_bv = jnp.flip(jnp.sort(scaled_bv, axis=-1), axis=-1)
    in_top_k_bv = jnp.arange(v)[None] < k_b[:, None]
    probs_bv = numerics.softmax(sorted_bv, axis=-1, where=in_top_k_bv)
    num_kept_b, _ = _num_kept(probs_bv, in_top_k_bv, k_b, top_p_b)
    threshold_b1 = jnp.take_along_axis(sorted_bv, (num_kept_b - 1)[:, None], axis=-1)
    return jnp.where(scaled_bv >= threshold_b1, scaled_bv, -jnp.inf)


def _draw(scaled_bv: jax.Array, a: SamplingArrays) -> tuple[jax.Array, jax.Array]:
    """min-p, then a Gumbel-max draw: the two best noisy scores and their ids, `[B, 2]` each."""
    v = scaled_bv.shape[-1]
    # min-p: drop p < min_p · p_max, i.e. x - x_max < log(min_p), with no
    # softmax needed (log 0 = -inf drops nothing).
    max_b1 = jnp.max(scaled_bv, axis=-1, keepdims=True)
    scaled_bv = jnp.where(scaled_bv - max_b1 < jnp.log(a.min_p_b)[:, None], -jnp.inf, scaled_bv)

    def gumbel_v(seed, choice, position):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), choice), position)
        return jax.random.gumbel(key, (v,), jnp.float32)

    gumbel_bv = jax.vmap(gumbel_v)(a.seed_b, a.choice_b, a.position_b)
    scores_b2, ids_b2 = jax.lax.top_k(scaled_bv + gumbel_bv, 2)
    return scores_b2, ids_b2


def decision_stability(best_scores_b2: jax.Array, best_ids_b2: jax.Array, logits_bv: jax.Array,
                       hidden_bd, head: jax.Array, *, head_is_vd: bool, scale_b: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
    """Margin m = y1 − y2 between the two best decision scores, and δ: how far the LM head's
    rounding moved them, from recomputing those two logits with every product kept (Dot2)
    — |logit − exact| plus the exact one's own rounding, times the decision's scale (1/T).

    A decision with m > 2δ would be the same with the two logits computed exactly; one
    with m ≤ 2δ is fragile. δ covers the LM head, not the layers before it.
    """
    if isinstance(hidden_bd, tuple):  # ULTRA's double-word hidden state: both parts count
        hidden_bd = jnp.concatenate(hidden_bd, axis=-1)
        columns_b2d = _head_columns(head, best_ids_b2, head_is_vd)
        columns_b2d = jnp.concatenate([columns_b2d, columns_b2d], axis=-1)
    else:
        columns_b2d = _head_columns(head, best_ids_b2, head_is_vd)
    exact_b2 = numerics.compensated_dot(hidden_bd.astype(jnp.float32)[:, None, :], columns_b2d)
    computed_b2 = jnp.take_along_axis(logits_bv, best_ids_b2, axis=-1)
    error_b2 = jnp.abs(computed_b2 - exact_b2) + jnp.abs(exact_b2) * 2.0**-24
    margin_b = best_scores_b2[:, 0] - best_scores_b2[:, 1]
    return margin_b, jnp.max(error_b2, axis=-1) * scale_b


def _head_columns(head: jax.Array, ids_b2: jax.Array, head_is_vd: bool) -> jax.Array:
    """The LM head's weights of tokens `ids_b2`, `[B, 2, D]` float32."""
    columns = head[ids_b2] if head_is_vd else jnp.moveaxis(jnp.take(head, ids_b2, axis=1), 0, -1)
    return columns.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("num_top_logprobs", "with_logprobs", "precision", "head_is_vd"))
def sample_tokens(logits_bv: jax.Array, arrays: SamplingArrays, *,
                  num_top_logprobs: int, with_logprobs: bool = True,
                  precision: numerics.Precision = numerics.Precision.STANDARD,
                  hidden_bd=None, head: jax.Array | None = None, head_is_vd: bool = True) -> SampleResult:
    """One token per row of logits `[B, V]`, with the raw log-probs OpenAI reports.

    Order (vLLM's): logit bias; banned ids to -inf; repetition, frequency and
    presence penalties; greedy rows (temperature 0) take the argmax here;
    temperature; top-k; top-p; min-p; a Gumbel-max draw keyed by
    fold_in(fold_in(key(seed), choice), position). `num_top_logprobs` is
    static: it fixes the shape of the top-logprob outputs. `with_logprobs`
    False skips the log-softmax over the vocabulary (a pass the size of the
    logits) when no row asked for logprobs; `logprob_b` is then zero.
    `precision` (static) picks the log-softmax's numerics: under HIGH and
    ULTRA a row's logprobs are the same bits in any batch. With the hidden
    states and the LM head's weights (`[V, D]` when `head_is_vd`, else
    `[D, V]`), each decision's stability is measured (`decision_stability`);
    without them its margin and bound are zero.
    """
    a = arrays
    b, v = logits_bv.shape
    if not 0 <= num_top_logprobs <= v:
        raise ValueError(f"num_top_logprobs must be in [0, {v}], got {num_top_logprobs}")
    logits_bv = logits_bv.astype(jnp.float32)

    processed_bv = logits_bv.at[jnp.arange(b)[:, None], a.bias_ids_bk].add(a.bias_values_bk)
    banned_ids_bs = jnp.where(a.banned_mask_bs, a.banned_ids_bs, v)  # v: dropped
    processed_bv = processed_bv.at[jnp.arange(b)[:, None], banned_ids_bs].set(-jnp.inf, mode="drop")
    # Building [B, V] counts costs a pass over the logits; skip it when no row
    # has history. Rows without penalties come out bitwise unchanged either way
    # (x / 1, x * 1, x - 0), so the branch taken never changes a row's result.
    processed_bv = jax.lax.cond(jnp.any(a.history_mask_bl), _apply_penalties,
                                lambda x, _: x, processed_bv, a)
    # Greedy rows take the best processed logit (top-k breaks ties to the lower id, as argmax
    # does); the second best gives the decision's margin.
    greedy_scores_b2, greedy_ids_b2 = jax.lax.top_k(processed_bv, 2)

    is_sampled_b = a.temperature_b > 0
    scaled_bv = processed_bv / jnp.where(is_sampled_b, a.temperature_b, 1.0)[:, None]
    # Truncation needs the most likely tokens in order: only when some
    # sampled row truncates. Rows that do not come out unchanged either way.
    is_truncated_b = is_sampled_b & (((a.top_k_b > 0) & (a.top_k_b < v)) | (a.top_p_b < 1))
    scaled_bv = jax.lax.cond(jnp.any(is_truncated_b), _top_k_top_p, lambda x, *_: x,
                             scaled_bv, a.top_k_b, a.top_p_b, is_truncated_b)
    # The Gumbel noise ([B, V] random draws) costs more than the rest of the
    # sampler: only when some row samples. Greedy rows take their own best either way.
    drawn_scores_b2, drawn_ids_b2 = jax.lax.cond(jnp.any(is_sampled_b), _draw,
                                                 lambda *_: (greedy_scores_b2, greedy_ids_b2), scaled_bv, a)
    best_scores_b2 = jnp.where(is_sampled_b[:, None], drawn_scores_b2, greedy_scores_b2)
    best_ids_b2 = jnp.where(is_sampled_b[:, None], drawn_ids_b2, greedy_ids_b2)
    token_ids_b = best_ids_b2[:, 0].astype(jnp.int32)
    if hidden_bd is None:
        margin_b = error_bound_b = jnp.zeros((b,), jnp.float32)
    else:
        scale_b = 1.0 / jnp.where(is_sampled_b, a.temperature_b, 1.0)  # decision units: logits / T
        margin_b, error_bound_b = decision_stability(best_scores_b2, best_ids_b2, logits_bv, hidden_bd, head,
                                                     head_is_vd=head_is_vd, scale_b=scale_b)

    if with_logprobs or num_top_logprobs:
        raw_logprobs_bv = numerics.log_softmax(logits_bv, axis=-1, precision=precision)
        logprob_b = jnp.take_along_axis(raw_logprobs_bv, token_ids_b[:, None], axis=-1)[:, 0]
    else:
        logprob_b = jnp.zeros((b,), jnp.float32)
    if num_top_logprobs:
        top_logprobs_bk, top_ids_bk = jax.lax.top_k(raw_logprobs_bv, num_top_logprobs)
    else:
        top_logprobs_bk, top_ids_bk = jnp.zeros((b, 0), jnp.float32), jnp.zeros((b, 0), jnp.int32)
    return SampleResult(token_ids_b=token_ids_b, logprob_b=logprob_b,
                        top_ids_bk=top_ids_bk.astype(jnp.int32), top_logprobs_bk=top_logprobs_bk,
                        margin_b=margin_b, error_bound_b=error_bound_b)
