"""Quest and the page digests against an independent numpy reference (ALGORITHMS.md section 2)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import Full
from kvjax.methods.quest import Quest
from kvjax.pages import add_token, prompt_digests
from tests.kvjax.method_harness import HKV, HQ, D, check_prefill, check_steps_per_head, run_method

G = HQ // HKV


def np_quest_keep(q, k, c, budget, page_size):
    """Positions 0..c one query head attends: its top `budget/page_size - 1` full pages by the
    min/max bound, plus the page holding the current token. q [d], k [S, d] of its KV head."""
    full = c // page_size
    scores = []
    for j in range(full):
        page = k[j * page_size : (j + 1) * page_size]
        lo, hi = page.min(0), page.max(0)
        scores.append(np.maximum(q * lo, q * hi).sum())
    keep = np.zeros(c + 1, bool)
    for j in np.argsort(-np.array(scores), kind="stable")[: budget // page_size - 1]:
        keep[j * page_size : (j + 1) * page_size] = True
    keep[full * page_size :] = True
    return keep


def test_digests_match_numpy():
    rng = np.random.default_rng(0)
    k = rng.standard_normal((2, HKV, 24, D)).astype(np.float32)
    lengths = np.array([24, 13])
    lo, hi = map(np.asarray, prompt_digests(jnp.asarray(k), jnp.asarray(lengths), 4))
    for b, n in enumerate(lengths):
        for j in range(6):
            part = k[b, :, j * 4 : min((j + 1) * 4, n)]
            if part.shape[1]:
                np.testing.assert_array_equal(lo[b, :, j], part.min(1))
                np.testing.assert_array_equal(hi[b, :, j], part.max(1))
    # Folding the rest of row 1's tokens in one by one completes its pages.
    lo, hi = jnp.asarray(lo), jnp.asarray(hi)
    for pos in range(13, 24):
        lo, hi = add_token(lo, hi, jnp.asarray(k[:, :, pos]), jnp.array([0, pos]), 4)
    np.testing.assert_array_equal(np.asarray(lo)[1], k[1].reshape(HKV, 6, 4, D).min(2))
    np.testing.assert_array_equal(np.asarray(hi)[1], k[1].reshape(HKV, 6, 4, D).max(2))


@pytest.mark.parametrize(
    "budget,page_size,lengths,steps",
    [(16, 4, [37, 20, 5], 14), (24, 8, [64, 41], 9), (12, 2, [19], 6)],
)
def test_decode_matches_numpy_reference(budget, page_size, lengths, steps):
    method = Quest(budget=budget, page_size=page_size, dense_layers=0)
    out, step_list, q, k, v = run_method(method, lengths, steps, seed=budget + page_size)
    check_prefill(out, q, k, v, lengths)

    def keep(step, b, h):
        c = step[1][b]
        return np_quest_keep(q[b, c, h], k[b, :, h // G], c, budget, page_size)

    check_steps_per_head(step_list, q, k, v, keep)


def test_covering_budget_equals_full():
    lengths, steps = [45, 30], 12
    full = run_method(Full(), lengths, steps, seed=3)[1]
    got = run_method(Quest(budget=64, page_size=8, dense_layers=0), lengths, steps, seed=3)[1]
    for (a, *_), (b, *_) in zip(full, got):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"budget": 16, "page_size": 16}, "budget must be an integer >= 32"),
        ({"page_size": 0}, "page_size"),
        ({"impl": "triton"}, "impl must be one of"),
    ],
)
def test_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Quest(**kwargs)  # on construction, before any cache exists
