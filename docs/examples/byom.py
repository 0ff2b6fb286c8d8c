"""Bring your own model: drive a kvjax method from your own JAX attention code.

No `models` package, no tokenizer: random post-RoPE queries, keys and values stand in for
what your attention layer computes. The script

1. describes the cache with a `CacheSpec` and allocates it with `kvjax.init_cache`,
2. prefills a right-padded batch of prompts with `method.prefill` (layer by layer),
3. runs a few decode steps with `method.attend`,
4. compares every output with plain dense softmax attention over all tokens so far.

With a budget that covers the whole context a method must equal dense attention (the
exactness property of ALGORITHMS.md section 0); with a small budget it attends only a subset
and differs. Run it with `python docs/examples/byom.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax import CacheSpec, ClusterKV, Quest

# Shapes of "your" model: 3 attention layers, 4 query heads sharing 2 KV heads (GQA), d = 16.
LAYERS, HQ, HKV, D = 3, 4, 2, 16
PROMPT_LENGTHS = (200, 150)  # a batch of two prompts, right-padded to the longest
SHORT_AND_LONG = (200, 28)
DECODE_STEPS = 4


def dense_attention(q, k, v):
    """The reference: one new token's query q [Hq, d] against k/v [S, Hkv, d] (every token
    so far, the new one included), query heads grouped over KV heads, scale 1/sqrt(d).
    Plain numpy, independent of kvjax."""
    hq, d = q.shape
    group = hq // k.shape[1]
    out = np.empty_like(q)
    for h in range(hq):
        s = k[:, h // group] @ q[h] / np.sqrt(d)
        p = np.exp(s - s.max())
        out[h] = (p / p.sum()) @ v[:, h // group]
    return out


def make_steps(method):
    """Jitted prefill and decode step over all layers, the cache donated as in kvjax's own
    generation loop. In a real model each layer's q/k/v come from that layer's projections
    (after RoPE); here they are given per layer."""

    def prefill(cache, q, k, v, lengths):
        # q [L, B, T, Hq, d], k/v [L, B, T, Hkv, d]: one slice per layer.
        outs, layers = [], []
        for layer, layer_cache in enumerate(cache.layers):
            out, layer_cache = method.prefill(layer, layer_cache, q[layer], k[layer], v[layer], lengths)
            outs.append(out)
            layers.append(layer_cache)
        return jnp.stack(outs), cache.replace(layers=tuple(layers), lengths=lengths)

    def attend(cache, q, k, v):
        # q [L, B, Hq, d], k/v [L, B, Hkv, d]: the token at position cache.lengths[b].
        outs, layers = [], []
        for layer, layer_cache in enumerate(cache.layers):
            out, layer_cache = method.attend(layer, layer_cache, q[layer], k[layer], v[layer], cache.lengths)
            outs.append(out)
            layers.append(layer_cache)
        return jnp.stack(outs), cache.replace(layers=tuple(layers), lengths=cache.lengths + 1)

    return jax.jit(prefill, donate_argnums=0), jax.jit(attend, donate_argnums=0)


def run(method, prompt_lengths=PROMPT_LENGTHS, seed: int = 0) -> list[float]:
    """Per sequence: the largest |method - dense| over the decode steps, layers and heads."""
    rng = np.random.default_rng(seed)
    batch, bucket = len(prompt_lengths), max(prompt_lengths)
    total = bucket + DECODE_STEPS
    # Random stand-ins for every position's q/k/v, per layer.
    q = rng.standard_normal((LAYERS, batch, total, HQ, D)).astype(np.float32)
    k = rng.standard_normal((LAYERS, batch, total, HKV, D)).astype(np.float32)
    v = rng.standard_normal((LAYERS, batch, total, HKV, D)).astype(np.float32)

    spec = CacheSpec(batch=batch, capacity=total, num_layers=LAYERS, num_heads=HQ, num_kv_heads=HKV, head_dim=D)
    cache = kvjax.init_cache(method, spec)  # validates the method, then method.init_cache per layer
    prefill, attend = make_steps(method)

    lengths = np.array(prompt_lengths, np.int32)
    # Right padding: slots past a prompt's length hold garbage that must never be attended
    # (here: fresh noise, not the tokens that are decoded at those positions later).
    pad = np.arange(bucket)[None, None, :, None, None] >= lengths[None, :, None, None, None]
    prompt = [np.where(pad, rng.standard_normal(x[:, :, :bucket].shape).astype(np.float32), x[:, :, :bucket])
              for x in (q, k, v)]
    _, cache = prefill(cache, *prompt, jnp.asarray(lengths))

    worst = [0.0] * batch
    rows = np.arange(batch)
    for _ in range(DECODE_STEPS):
        pos = lengths  # each sequence decodes at its own length
        out, cache = attend(cache, q[:, rows, pos], k[:, rows, pos], v[:, rows, pos])
        out = np.asarray(out)
        for b, n in enumerate(pos):
            for layer in range(LAYERS):
                ref = dense_attention(q[layer, b, n], k[layer, b, : n + 1], v[layer, b, : n + 1])
                worst[b] = max(worst[b], float(np.abs(out[layer, b] - ref).max()))
        lengths = lengths + 1
    return worst


def main() -> dict[str, list[float]]:
    # Budgets that cover the whole context give dense attention up to float rounding.
    # ClusterKV attends its 16 sinks, whole clusters of the other prompt tokens (184 at most,
    # 240 slots) and the decode window; Quest attends 256/16 - 1 = 15 full pages (240 tokens)
    # plus the partial page. With the default dense_layers=2, layers 0 and 1 stay dense and
    # layer 2 runs the sparse method.
    runs = {
        "ClusterKV(budget=256)": (ClusterKV(budget=256, sink=16, tokens_per_cluster=16), PROMPT_LENGTHS),
        "Quest(budget=256)": (Quest(budget=256, page_size=16), PROMPT_LENGTHS),
        # 48 tokens = 2 full pages + the partial page: that covers a 28-token prompt (plus 4
        # decoded tokens) but not a 200-token one, where layer 2 attends a subset.
        "Quest(budget=48)": (Quest(budget=48, page_size=16), SHORT_AND_LONG),
    }
    errors = {}
    print(f"max |method - dense| per sequence over {DECODE_STEPS} decode steps and {LAYERS} layers")
    for name, (method, lengths) in runs.items():
        errors[name] = run(method, lengths)
        cells = "  ".join(f"{n}-token prompt: {e:.1e}" for n, e in zip(lengths, errors[name]))
        print(f"  {name:22s} {cells}")
    return errors


if __name__ == "__main__":
    main()
