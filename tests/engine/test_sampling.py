"""The sampler: parameters, the host-side packer and the on-device draw.

Draws use fixed seeds, so the frequency checks are deterministic, not flaky.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from engine.sampler import SamplingRow, pack_sampling, sample_tokens
from engine.sampling import SamplingParams

PROBS = np.array([0.5, 0.3, 0.15, 0.05])
# One batch size for every draw over PROBS, so those draws share compiled programs.
SEEDS = np.arange(2000)


def _sample(logits_bv, rows, *, num_top_logprobs=0, batch_size=None):
    logits_bv = np.asarray(logits_bv, np.float32)
    arrays = pack_sampling(rows, vocab_size=logits_bv.shape[-1], batch_size=batch_size)
    logits_bv = np.pad(logits_bv, ((0, len(arrays.seed_b) - len(rows)), (0, 0)))  # padding rows
    result = sample_tokens(jnp.asarray(logits_bv), arrays, num_top_logprobs=num_top_logprobs)
    return tuple(np.asarray(x)[:len(rows)] for x in result[:4])


def _draw(logits_v, params, *, seeds, position=7, **row_fields):
    rows = [SamplingRow(params=params, seed=int(s), position=position, **row_fields) for s in seeds]
    return _sample(np.tile(logits_v, (len(rows), 1)), rows)[0]


def _log_softmax64(logits_bv):
    x = np.asarray(logits_bv, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# --- the draw ---------------------------------------------------------------------------------

def test_greedy_is_argmax():
    logits = np.random.default_rng(0).normal(size=(5, 100)).astype(np.float32)
    greedy = SamplingParams(temperature=0.0, top_k=3, top_p=0.5)  # truncation is moot when greedy
    ids, *_ = _sample(logits, [SamplingRow(params=greedy, seed=i, position=i) for i in range(5)])
    np.testing.assert_array_equal(ids, logits.argmax(-1))


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_frequencies_follow_the_tempered_softmax(temperature):
    ids = _draw(np.log(PROBS), SamplingParams(temperature=temperature), seeds=SEEDS)
    expected = PROBS ** (1 / temperature) / np.sum(PROBS ** (1 / temperature))
    np.testing.assert_allclose(np.bincount(ids, minlength=4) / len(ids), expected, atol=0.03)


def test_top_p_keeps_the_smallest_sufficient_set():
    # Mass before token 2 is 0.8 ≥ 0.75, so only tokens 0 and 1 may be drawn.
    ids = _draw(np.log(PROBS), SamplingParams(top_p=0.75), seeds=SEEDS)
    assert set(np.unique(ids)) == {0, 1}
    np.testing.assert_allclose(np.mean(ids == 0), 0.5 / 0.8, atol=0.04)
    # A tiny top_p keeps only the most likely token.
    assert set(_draw(np.log(PROBS), SamplingParams(top_p=0.01), seeds=SEEDS)) == {0}


def _reference_kept(scaled_v, top_k, top_p):
    """The tokens top-k then top-p keep, in float64: mass of strictly more likely tokens < top_p."""
    order = np.argsort(-scaled_v.astype(np.float64), kind="stable")
    k = top_k or len(scaled_v)
    top = scaled_v[order[:k]].astype(np.float64)
    probs = np.exp(top - top.max())
    probs /= probs.sum()
    mass_before = np.cumsum(probs) - probs
    num_kept = int(np.sum(mass_before < top_p)) if top_p < 1 else k
    return set(order[:num_kept].tolist())


def test_truncation_over_a_large_vocabulary_matches_a_reference_on_both_paths():
    # Rows each candidate tier decides (peaked, or top-k within the tier) and
    # rows that need the full sort (flat, or top-k beyond every tier) in one batch.
    from engine.sampler import TRUNCATION_TIERS, _top_k_top_p

    small, large = TRUNCATION_TIERS
    rng = np.random.default_rng(11)
    v = 2 * large
    peaked = rng.normal(scale=4.0, size=v)
    flat = rng.normal(scale=0.05, size=v)
    middling = rng.normal(scale=1.2, size=v)  # a nucleus between the tiers
    cases = [(peaked, 0, 0.9), (peaked, 50, 0.95), (middling, 0, 0.6), (flat, 0, 0.9), (flat, 100, 1.0),
             (flat, small + 7, 0.5), (flat, large + 7, 0.5), (peaked, large + 7, 1.0),
             (flat, 0, 1.0)]  # the last one does not truncate
    scaled = np.stack([x for x, _, _ in cases]).astype(np.float32)
    top_k = np.array([k for _, k, _ in cases], np.int32)
    top_p = np.array([p for _, _, p in cases], np.float32)
    is_truncated = (top_k > 0) | (top_p < 1)
    out = np.asarray(_top_k_top_p(jnp.asarray(scaled), jnp.asarray(top_k), jnp.asarray(top_p),
                                  jnp.asarray(is_truncated)))
    for row, (x, k, p) in enumerate(cases):
        kept = set(np.flatnonzero(np.isfinite(out[row])).tolist())
        assert kept == (_reference_kept(scaled[row], k, p) if is_truncated[row] else set(range(v))), row
        np.testing.assert_array_equal(out[row][list(kept)], scaled[row][list(kept)])
    assert small < len(_reference_kept(scaled[2], 0, 0.6)) < large  # the middle tier decided it
    assert len(_reference_kept(scaled[3], 0, 0.9)) > large  # the flat row did need the sort

    # Alone, each row comes out bitwise the same as in the mixed batch.
    for row in range(len(cases)):
        alone = np.asarray(_top_k_top_p(jnp.asarray(scaled[row:row + 1]), jnp.asarray(top_k[row:row + 1]),
                                        jnp.asarray(top_p[row:row + 1]), jnp.asarray(is_truncated[row:row + 1])))
        np.testing.assert_array_equal(alone[0], out[row])


def test_top_k_keeps_the_k_most_likely():
    ids = _draw(np.log(PROBS), SamplingParams(top_k=2), seeds=SEEDS)
    assert set(np.unique(ids)) == {0, 1}
    np.testing.assert_allclose(np.mean(ids == 0), 0.5 / 0.8, atol=0.04)
    assert set(_draw(np.log(PROBS), SamplingParams(top_k=1), seeds=SEEDS)) == {0}
    # k at least the vocabulary is no limit.
    assert set(_draw(np.log(PROBS), SamplingParams(top_k=9), seeds=SEEDS)) == {0, 1, 2, 3}


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    # Within the top 3, mass before token 2 is 0.8 / 0.95 ≈ 0.84 ≥ 0.83: token 2 goes
    # (over the full distribution it would be 0.8 < 0.83 and stay).
    ids = _draw(np.log(PROBS), SamplingParams(top_k=3, top_p=0.83), seeds=SEEDS)
    assert set(np.unique(ids)) == {0, 1}


def test_min_p_drops_tokens_below_a_fraction_of_the_most_likely():
    # 0.35 · 0.5 = 0.175: tokens 2 (0.15) and 3 (0.05) go.
    ids = _draw(np.log(PROBS), SamplingParams(min_p=0.35), seeds=SEEDS)
    assert set(np.unique(ids)) == {0, 1}
    np.testing.assert_allclose(np.mean(ids == 0), 0.5 / 0.8, atol=0.04)


def test_logit_bias_forces_and_bans():
    logits = np.random.default_rng(2).normal(size=(1, 50)).astype(np.float32)
    worst, best = int(logits.argmin()), int(logits.argmax())
    forced = SamplingParams(temperature=0.0, logit_bias={worst: 100.0})
    assert _sample(logits, [SamplingRow(params=forced, seed=0, position=0)])[0][0] == worst
    banned = SamplingParams(temperature=0.0, logit_bias={best: -100.0})
    assert _sample(logits, [SamplingRow(params=banned, seed=0, position=0)])[0][0] == np.argsort(logits[0])[-2]
    ids = _draw(np.log(PROBS), SamplingParams(logit_bias={0: -100.0, 1: -100}), seeds=SEEDS)
    assert set(np.unique(ids)) == {2, 3}


def test_banned_ids_are_never_drawn():
    ids = _draw(np.log(PROBS), SamplingParams(), seeds=SEEDS, banned_ids=[0, 2])
    assert set(np.unique(ids)) == {1, 3}
    logits = np.log(PROBS)[None]
    row = SamplingRow(params=SamplingParams(temperature=0.0), seed=0, position=0, banned_ids=[0])
    assert _sample(logits, [row])[0][0] == 1


def test_banned_token_ids_hold_back_stop_tokens_until_min_tokens():
    params = SamplingParams(min_tokens=3, stop_token_ids=[7, 5])
    assert params.banned_token_ids(num_output_tokens=2, eos_token_ids=[2]) == (2, 5, 7)
    assert params.banned_token_ids(num_output_tokens=3, eos_token_ids=[2]) == ()
    ignore_eos = dataclasses.replace(params, ignore_eos=True)
    assert ignore_eos.banned_token_ids(num_output_tokens=0, eos_token_ids=[2]) == (5, 7)


def _reference_processed(logits_bv, params, histories, banned):
    """float64 numpy: bias, bans, repetition (prompt + output), frequency and presence (output)."""
    out = np.asarray(logits_bv, np.float64).copy()
    for i, (p, (prompt, output), ban) in enumerate(zip(params, histories, banned)):
        for token_id, bias in p.logit_bias or ():
            out[i, token_id] += bias
        out[i, ban] = -np.inf
        seen = np.zeros(out.shape[1], bool)
        seen[list(prompt) + list(output)] = True
        penalised = np.where(out[i] > 0, out[i] / p.repetition_penalty, out[i] * p.repetition_penalty)
        out[i] = np.where(seen, penalised, out[i])
        counts = np.bincount(np.asarray(output, int), minlength=out.shape[1])
        out[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    return out


def test_penalties_bias_and_bans_match_a_numpy_reference():
    rng = np.random.default_rng(3)
    b, v = 64, 40
    logits = rng.normal(scale=2.0, size=(b, v)).astype(np.float32)
    params, histories, banned, rows = [], [], [], []
    for i in range(b):
        p = SamplingParams(
            temperature=0.0, repetition_penalty=float(rng.choice([1.0, 0.7, 1.3, 2.0])),
            presence_penalty=float(rng.uniform(-2, 2)), frequency_penalty=float(rng.uniform(-2, 2)),
            logit_bias={int(t): float(rng.uniform(-3, 3)) for t in rng.integers(0, v, size=rng.integers(0, 4))})
        history = ([int(t) for t in rng.integers(0, v, size=rng.integers(0, 12))],
                   [int(t) for t in rng.integers(0, v, size=rng.integers(0, 12))])
        ban = sorted({int(t) for t in rng.integers(0, v, size=rng.integers(0, 3))})
        params.append(p), histories.append(history), banned.append(ban)
        rows.append(SamplingRow(params=p, seed=i, position=0, prompt_ids=history[0],
                                output_ids=history[1], banned_ids=ban))
    reference = _reference_processed(logits, params, histories, banned)
    top2 = np.sort(reference, -1)[:, -2:]
    assert np.all(top2[:, 1] - top2[:, 0] > 1e-3)  # no near ties for float32 to break otherwise
    ids, *_ = _sample(logits, rows)
    np.testing.assert_array_equal(ids, reference.argmax(-1))
    assert np.sum(ids != logits.argmax(-1)) > b // 4  # the processing really changed choices


def test_logprobs_are_the_raw_model_distribution():
    rng = np.random.default_rng(4)
    logits = rng.normal(scale=3.0, size=(6, 1000)).astype(np.float32)
    reference = _log_softmax64(logits)
    plain = [SamplingRow(params=SamplingParams(temperature=0.0), seed=i, position=3) for i in range(6)]
    shaped_params = SamplingParams(temperature=0.3, top_k=50, repetition_penalty=1.5,
                                   presence_penalty=1.0, logit_bias={5: 10.0})
    shaped = [SamplingRow(params=shaped_params, seed=i, position=3, output_ids=[1, 2, 2])
              for i in range(6)]
    for rows in (plain, shaped):
        ids, logprob, top_ids, top_logprobs = _sample(logits, rows, num_top_logprobs=5)
        np.testing.assert_allclose(logprob, reference[np.arange(6), ids], atol=1e-5)
        np.testing.assert_array_equal(top_ids, np.argsort(-reference, -1)[:, :5])
        np.testing.assert_allclose(top_logprobs, -np.sort(-reference, -1)[:, :5], atol=1e-5)
    assert _sample(logits, plain)[2].shape == (6, 0)


def _mixed_rows(rng, num_rows, vocab_size):
    rows = []
    for i in range(num_rows):
        kind = i % 4
        p = SamplingParams(
            temperature=0.0 if kind == 0 else float(rng.uniform(0.3, 1.5)),
            top_k=int(rng.integers(1, 20)) if kind == 2 else None,
            top_p=float(rng.uniform(0.5, 1.0)) if kind in (2, 3) else 1.0,
            min_p=0.05 if kind == 3 else 0.0,
            frequency_penalty=0.5 if i % 3 == 0 else 0.0,
            logit_bias={int(rng.integers(vocab_size)): 2.0} if i % 5 == 0 else None)
        rows.append(SamplingRow(params=p, seed=int(rng.integers(2**32)), choice=0, position=int(rng.integers(100)),
                                prompt_ids=[int(t) for t in rng.integers(0, vocab_size, size=i)],
                                output_ids=[int(t) for t in rng.integers(0, vocab_size, size=i % 7)],
                                banned_ids=[i] if i % 2 else []))
    return rows


def test_a_row_samples_the_same_alone_or_anywhere_in_any_batch():
    rng = np.random.default_rng(5)
    b, v = 16, 300
    logits = rng.normal(scale=2.0, size=(b, v)).astype(np.float32)
    rows = _mixed_rows(rng, b, v)
    together = _sample(logits, rows, num_top_logprobs=2)
    order = rng.permutation(b)
    shuffled = _sample(logits[order], [rows[i] for i in order], num_top_logprobs=2, batch_size=32)
    for got, want in zip(shuffled, together):
        np.testing.assert_array_equal(got, want[order])  # bitwise, not approximately
    for i in (0, 1, 2, 3, 6, 15):  # greedy, sampled, top-k + top-p, min-p; with and without history
        alone = _sample(logits[i:i + 1], [rows[i]], num_top_logprobs=2)
        for got, want in zip(alone, together):
            np.testing.assert_array_equal(got[0], want[i])
    assert len(set(together[0][1::4])) > 1  # the sampled rows are not all alike


def test_choices_and_positions_draw_independently():
    logits_v = np.random.default_rng(6).normal(size=1000).astype(np.float32)
    params = SamplingParams(n=50, temperature=1.0)
    rows = [SamplingRow(params=params, seed=42, choice=c, position=7) for c in range(50)]
    by_choice = _sample(np.tile(logits_v, (50, 1)), rows)[0]
    assert len(set(by_choice)) > 10
    by_position = _draw(logits_v, params, seeds=[42] * 50, position=7)
    assert len(set(by_position)) == 1  # same seed, choice and position: same token
    rows = [SamplingRow(params=params, seed=42, position=p) for p in range(50)]
    assert len(set(_sample(np.tile(logits_v, (50, 1)), rows)[0])) > 10


# --- parameters ---------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("n", 0), ("n", 1.5), ("max_tokens", 0), ("min_tokens", -1), ("min_tokens", 17),
    ("temperature", -1.0), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", 0), ("top_k", 2.5), ("min_p", -0.1), ("min_p", 1.1),
    ("presence_penalty", 2.5), ("frequency_penalty", -2.1), ("repetition_penalty", 0.0),
    ("logit_bias", {1: 101.0}), ("logit_bias", {-1: 1.0}), ("logit_bias", {"a": 1.0}), ("logit_bias", [1, 2]),
    ("seed", -1), ("seed", 2**32), ("logprobs", 21), ("logprobs", -1), ("prompt_logprobs", 21),
    ("stop", [""]), ("stop", [3]), ("stop_token_ids", [-1]), ("ignore_eos", "yes"),
    ("skip_special_tokens", None), ("include_stop_str_in_output", 1),
])
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} "):
        SamplingParams(**{field: value})


def test_sampling_params_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.n, p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.logprobs) == (
        1, 16, 1.0, 1.0, None, None, None)
    assert not p.is_greedy and not p.needs_history
    assert SamplingParams(max_tokens=5, temperature=0.0, top_p=0.9, seed=3).is_greedy  # the old callers
    p = SamplingParams(stop="END", stop_token_ids=[3, 4], logit_bias={9: 1, 2: -0.5})
    assert p.stop == ("END",) and p.stop_token_ids == (3, 4)
    assert p.logit_bias == ((2, -0.5), (9, 1.0))
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop=None, stop_token_ids=None).stop == ()
    assert SamplingParams(logit_bias={}).logit_bias is None
    assert hash(p) == hash(dataclasses.replace(p))  # replace passes the stored pairs back in
    assert SamplingParams(frequency_penalty=0.1).needs_history


def test_sampling_row_validation():
    with pytest.raises(ValueError, match="^choice "):
        SamplingRow(params=SamplingParams(n=2), seed=0, position=0, choice=2)
    with pytest.raises(ValueError, match="^seed "):
        SamplingRow(params=SamplingParams(), seed=-1, position=0)


# --- packing --------------------------------------------------------------------------------

def test_pack_pads_widths_to_powers_of_two():
    penalised = SamplingParams(repetition_penalty=1.1)
    rows = [SamplingRow(params=penalised, seed=1, position=9, prompt_ids=[1, 2, 3], output_ids=[4, 5],
                        banned_ids=[0, 1, 2], choice=0),
            SamplingRow(params=SamplingParams(logit_bias={3: 1.0, 4: 2.0, 5: 3.0}), seed=2, position=4)]
    a = pack_sampling(rows, vocab_size=10, batch_size=4)
    assert a.history_bl.shape == (4, 8) and a.bias_ids_bk.shape == (4, 4) and a.banned_ids_bs.shape == (4, 4)
    np.testing.assert_array_equal(a.history_mask_bl.sum(-1), [5, 0, 0, 0])
    np.testing.assert_array_equal(a.is_output_bl[0], [0, 0, 0, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(a.history_bl[0, :5], [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(a.bias_values_bk[1], [1, 2, 3, 0])
    np.testing.assert_array_equal(a.banned_mask_bs.sum(-1), [3, 0, 0, 0])
    np.testing.assert_array_equal(a.temperature_b, [1, 1, 0, 0])  # padding rows are greedy
    assert a.seed_b.dtype == np.uint32 and a.top_k_b.dtype == np.int32

    # No penalties anywhere: one masked history column; nothing biased or banned: one of each.
    plain = pack_sampling([SamplingRow(params=SamplingParams(), seed=0, position=0, prompt_ids=[1] * 9)],
                          vocab_size=10)
    assert plain.history_bl.shape == (1, 1) and not plain.history_mask_bl.any()
    assert plain.bias_ids_bk.shape == (1, 1) and plain.banned_ids_bs.shape == (1, 1)
    # Frequency and presence read only the output: the prompt is left out.
    output_only = pack_sampling([SamplingRow(params=SamplingParams(presence_penalty=1.0), seed=0, position=0,
                                             prompt_ids=[1] * 9, output_ids=[2, 3, 4])], vocab_size=10)
    assert output_only.history_bl.shape == (1, 4) and output_only.is_output_bl.sum() == 3


def test_pack_rejects_bad_ids_and_sizes():
    with pytest.raises(ValueError, match="banned_ids"):
        pack_sampling([SamplingRow(params=SamplingParams(), seed=0, position=0, banned_ids=[10])],
                      vocab_size=10)
    with pytest.raises(ValueError, match="logit_bias"):
        pack_sampling([SamplingRow(params=SamplingParams(logit_bias={12: 1.0}), seed=0, position=0)],
                      vocab_size=10)
    with pytest.raises(ValueError, match="batch_size"):
        pack_sampling([SamplingRow(params=SamplingParams(), seed=0, position=0)] * 2, vocab_size=10,
                      batch_size=1)


def test_stability_flags_every_top1_flip_against_float64():
    """Near-tie logits: tokens 0 and 1 have almost the same LM-head weights, and each row's
    hidden state is tuned so their exact logits differ by anything from 0 up. Wherever the
    float32 logits pick another token than the float64 ones, the sampler must flag the
    decision fragile (margin <= 2 bound); clear decisions must not be."""
    rng = np.random.default_rng(7)
    rows, d, v = 512, 576, 64
    head_vd = (rng.standard_normal((v, d)) * 0.05).astype(np.float32)
    head_vd[2:] -= 1.0  # every other token far behind
    head_vd[1] = head_vd[0] + (rng.standard_normal(d) * 1e-3).astype(np.float32)
    gap_d = head_vd[1].astype(np.float64) - head_vd[0]
    hidden = rng.standard_normal((rows, d)) * rng.uniform(0.5, 40, (rows, 1))
    # Scale each row's component along the gap so that its exact logit difference is t · (original).
    t = np.concatenate([np.zeros(32), np.logspace(-9, 0, rows - 32)]) * rng.choice([-1, 1], rows)
    along = (hidden @ gap_d) / (gap_d @ gap_d)
    hidden = (hidden - np.outer(along * (1 - t), gap_d)).astype(np.float32)
    logits_bv = np.asarray(jnp.asarray(hidden) @ jnp.asarray(head_vd).T)  # XLA's float32 matmul
    exact_bv = hidden.astype(np.float64) @ head_vd.astype(np.float64).T
    flips = np.argmax(logits_bv, -1) != np.argmax(exact_bv, -1)
    assert flips.sum() >= 5, "the control: float32 must flip some near ties"

    arrays = pack_sampling([SamplingRow(params=SamplingParams(temperature=0.0), seed=0, position=0)] * rows,
                           vocab_size=v)
    result = sample_tokens(jnp.asarray(logits_bv), arrays, num_top_logprobs=0,
                           hidden_bd=jnp.asarray(hidden), head=jnp.asarray(head_vd), head_is_vd=True)
    margin, bound = np.asarray(result.margin_b), np.asarray(result.error_bound_b)
    fragile = margin <= 2 * bound
    assert fragile[flips].all(), np.flatnonzero(flips & ~fragile)
    best_two = np.sort(exact_bv, -1)[:, -2:]
    clear = best_two[:, 1] - best_two[:, 0] > 1e-3
    assert clear.sum() > rows // 4 and not fragile[clear].any()
