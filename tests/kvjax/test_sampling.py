"""Temperature + nucleus (top-p) sampling (`kvjax.generation.sample_tokens`) against a numpy
reference of the nucleus, on both of its paths: the top-k candidates and the full ranking."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.generation import sample_tokens

V = 16  # vocabulary of the test logits
CANDIDATES = 4  # fewer than V, so both paths run
DRAWS = 4000


def reference_nucleus(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """Probabilities [V] of sampling each token: the softmax of logits / temperature restricted
    to the smallest prefix of the tokens by decreasing probability (ties: lower id first)
    whose mass reaches top_p, renormalised."""
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    order = np.argsort(-scaled, kind="stable")
    before = np.cumsum(probs[order]) - probs[order]
    kept = np.zeros(V, bool)
    kept[order[before < top_p]] = True
    out = np.where(kept, probs, 0.0)
    return out / out.sum()


def draws(logits: np.ndarray, temperature: float, top_p: float, candidates: int, n: int = DRAWS) -> np.ndarray:
    """n samples [n, B] from logits [B, V], one key each."""
    keys = jax.random.split(jax.random.PRNGKey(7), n)
    fn = jax.jit(jax.vmap(lambda key: sample_tokens(jnp.asarray(logits, jnp.float32), key, jnp.float32(temperature),
                                              jnp.float32(top_p), False, candidates)))
    return np.asarray(fn(keys))


def random_logits(seed: int, scale: float) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(V) * scale


PEAKED, FLAT = random_logits(0, 4.0), random_logits(1, 0.5)  # nucleus inside / beyond 4 candidates


@pytest.mark.parametrize("logits,temperature,top_p", [
    (PEAKED, 1.0, 0.9),
    (PEAKED, 0.5, 0.6),
    (FLAT, 1.0, 0.9),  # the nucleus holds more than CANDIDATES tokens: the full ranking
    (FLAT, 2.0, 1.0),  # every token
])
def test_samples_follow_the_reference_nucleus(logits, temperature, top_p):
    expected = reference_nucleus(logits, temperature, top_p)
    tokens = draws(logits[None], temperature, top_p, CANDIDATES)[:, 0]
    frequency = np.bincount(tokens, minlength=V) / len(tokens)
    assert set(np.flatnonzero(frequency)) <= set(np.flatnonzero(expected))  # never outside the nucleus
    np.testing.assert_allclose(frequency, expected, atol=0.03)  # ~4 standard deviations at 4000 draws


def test_both_paths_draw_the_same_tokens():
    """The draw is Gumbel-max in vocabulary order: ranking only the top candidates (when they
    hold the nucleus) and ranking every token give the same token for the same key, also in a
    batch where one row's nucleus does not fit the candidates and both rows fall back."""
    for batch in (PEAKED[None], np.stack([PEAKED, FLAT]), np.stack([FLAT * 8, PEAKED])):
        for temperature, top_p in ((1.0, 0.9), (0.7, 0.5), (1.5, 1.0)):
            fast = draws(batch, temperature, top_p, CANDIDATES, n=300)
            full = draws(batch, temperature, top_p, V, n=300)
            np.testing.assert_array_equal(fast, full)


def test_nucleus_of_one_token_is_greedy():
    tokens = draws(PEAKED[None], 1.0, 1e-6, CANDIDATES, n=200)
    assert (tokens == np.argmax(PEAKED)).all()
