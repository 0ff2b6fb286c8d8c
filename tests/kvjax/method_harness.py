"""Drive a method through its interface (no model) on random post-RoPE q/k/v.

A prompt is prefilled (right-padded, padding filled with noise so that a method caching or
attending padding fails), then tokens are decoded one by one; outputs are compared with
dense softmax attention over exactly the tokens the method is specified to keep.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import CacheSpec, init_cache

HQ, HKV, D = 4, 2, 8
TOL = 2e-5


def np_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """One query head vs. the kept keys: q [d], k/v [S, d], keep [S] bool -> [d]."""
    s = (k[keep] @ q) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max())
    return (p / p.sum()) @ v[keep]


def spec(batch: int, capacity: int) -> CacheSpec:
    return CacheSpec(batch=batch, capacity=capacity, num_layers=1, num_heads=HQ, num_kv_heads=HKV, head_dim=D)


def random_stream(rng, batch: int, total: int):
    """q [B, T, Hq, d], k/v [B, T, Hkv, d] for `total` positions per sequence."""
    q = rng.standard_normal((batch, total, HQ, D)).astype(np.float32)
    k = rng.standard_normal((batch, total, HKV, D)).astype(np.float32)
    v = rng.standard_normal((batch, total, HKV, D)).astype(np.float32)
    return q, k, v


def run_method(method, prompt_lengths, decode_steps, seed=0, bucket=None, observe=None, begin_step=False):
    """Prefill right-padded prompts, then decode `decode_steps` tokens per sequence.

    Returns (prefill output, [(step output, positions)...], q, k, v) as numpy arrays, where
    q/k/v hold the real token at every position. With `observe(cache, q, positions)`, each
    step's tuple gets a third item: what `observe` returned just before that step. With
    `begin_step`, each step starts with `method.begin_decode_step`, as in the model.
    """
    rng = np.random.default_rng(seed)
    batch = len(prompt_lengths)
    lengths = np.array(prompt_lengths)
    bucket = bucket or int(lengths.max())
    total = bucket + decode_steps
    q, k, v = random_stream(rng, batch, total)
    cache = init_cache(method, spec(batch, total)).layers[0]
    prefill = jax.jit(lambda c, q, k, v, n: method.prefill(0, c, q, k, v, n))
    begin = (lambda c, n: method.begin_decode_step((c,), n)[0]) if begin_step else (lambda c, n: c)
    attend = jax.jit(lambda c, q, k, v, n: method.attend(0, begin(c, n), q, k, v, n))
    # Prompt slots past each length are padding: fill them with other values than the tokens
    # decoded there later, so a method that caches or attends padding fails the comparison.
    pad = np.arange(bucket)[None, :, None, None] >= lengths[:, None, None, None]
    noise = [rng.standard_normal(x[:, :bucket].shape).astype(np.float32) for x in (q, k, v)]
    prompt = [np.where(pad, n, x[:, :bucket]) for n, x in zip(noise, (q, k, v))]
    out, cache = prefill(cache, *prompt, jnp.asarray(lengths))
    steps = []
    cur = lengths.copy()
    for _ in range(decode_steps):
        rows = np.arange(batch)
        seen = () if observe is None else (observe(cache, q[rows, cur], cur),)
        step_out, cache = attend(cache, q[rows, cur], k[rows, cur], v[rows, cur], jnp.asarray(cur))
        steps.append((np.asarray(step_out), cur.copy(), *seen))
        cur = cur + 1
    return np.asarray(out), steps, q, k, v


def check_prefill(out, q, k, v, lengths):
    for b, n in enumerate(lengths):
        for t in range(n):
            for h in range(HQ):
                keep = np.arange(q.shape[1]) <= t
                ref = np_attention(q[b, t, h], k[b, :, h // (HQ // HKV)], v[b, :, h // (HQ // HKV)], keep)
                np.testing.assert_allclose(out[b, t, h], ref, atol=TOL, rtol=0)


def check_steps(steps, q, k, v, keep_fn):
    """Every step output equals dense attention over `keep_fn(c)` ([c + 1] bool)."""
    check_steps_per_head(steps, q, k, v, lambda step, b, h: keep_fn(step[1][b]))


def check_steps_per_head(steps, q, k, v, keep_fn):
    """Every step output equals dense attention over `keep_fn(step, b, h)`, a bool mask of
    positions 0..c (c = that row's current position)."""
    for step in steps:
        out, cur = step[:2]
        for b, c in enumerate(cur):
            for h in range(HQ):
                keep = np.zeros(q.shape[1], bool)
                keep[: c + 1] = keep_fn(step, b, h)
                g = h // (HQ // HKV)
                np.testing.assert_allclose(out[b, h], np_attention(q[b, c, h], k[b, :, g], v[b, :, g], keep),
                                           atol=TOL, rtol=0)
