"""Exact softmax attention with grouped query heads, for prefill and for one decode step.

Scores and the softmax are computed in float32 whatever the cache dtype; the scale is
`1/sqrt(d)`. Query heads are grouped by KV head: `q` `[..., Hq, d]` is viewed as
`[..., Hkv, G, d]`.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from pallas_kernels import MASKED  # finite "masked" score shared with the kernels' parts (no NaN rows)

# A piece of one decode step's attention: (out [B, Hq, d] normalised over the piece,
# lse [B, Hq] log-sum-exp of its scaled scores). Disjoint pieces merge exactly.
Part = tuple[jax.Array, jax.Array]


def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    valid: jax.Array,
    current: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """One query token per sequence against a set of cached tokens (and itself).

    q: [B, Hq, d]; k, v: [B, Hkv, S, d]; valid: [B, S] or [B, Hkv, S] or [B, Hq, S]
    (per query head); current: the query token's own (k, v), [B, Hkv, d] each, always
    attended. Returns [B, Hq, d] in q's dtype.

    Methods pass the current token here and write it into the cache *after* attending:
    reading a buffer before updating it in place lets XLA skip copying the whole cache
    (see `kvjax.compat.compiler_options`).
    """
    parts = [attention_part(q, k, v, valid)]
    if current is not None:
        parts.append(current_token_part(q, *current))
    return merge_parts(parts).astype(q.dtype)


def attention_part(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array) -> Part:
    """Attention of each query over one set of tokens, as a mergeable `(out, lse)` part.

    q: [B, Hq, d]; k, v: [B, Hkv, S, d]; valid: [B, S], [B, Hkv, S] or [B, Hq, S].
    Returns out [B, Hq, d] (normalised over this part) and lse [B, Hq] float32; a part with
    no valid token has lse ~ MASKED and drops out of `merge_parts`.
    """
    b, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    qg = q.reshape(b, hkv, g, d).astype(jnp.float32)
    scale = 1.0 / jnp.sqrt(jnp.float32(d))
    s = jnp.einsum("bhgd,bhsd->bhgs", qg, k.astype(jnp.float32)) * scale
    if valid.ndim == 2:
        mask = valid[:, None, None, :]
    elif valid.shape[1] == hkv:
        mask = valid[:, :, None, :]
    else:
        mask = valid.reshape(b, hkv, g, -1)
    s = jnp.where(mask, s, MASKED)
    m = s.max(axis=-1)
    p = jnp.exp(s - m[..., None])
    total = p.sum(axis=-1)
    out = jnp.einsum("bhgs,bhsd->bhgd", p, v.astype(jnp.float32)) / total[..., None]
    return out.reshape(b, hq, d), (m + jnp.log(total)).reshape(b, hq)


def current_token_part(q: jax.Array, k_cur: jax.Array, v_cur: jax.Array) -> Part:
    """The query token attending to itself: k_cur, v_cur [B, Hkv, d]."""
    b, hq, d = q.shape
    hkv = k_cur.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, d).astype(jnp.float32)
    s = jnp.einsum("bhgd,bhd->bhg", qg, k_cur.astype(jnp.float32)) / jnp.sqrt(jnp.float32(d))
    out = jnp.broadcast_to(v_cur.astype(jnp.float32)[:, :, None], qg.shape)
    return out.reshape(b, hq, d), s.reshape(b, hq)


def merge_parts(parts: Sequence[Part]) -> jax.Array:
    """Exact softmax attention over the union of disjoint parts (log-sum-exp weights)."""
    lse = jnp.stack([p[1] for p in parts])  # [P, B, Hq]
    weights = jax.nn.softmax(lse, axis=0)
    return sum(w[..., None] * out for w, (out, _) in zip(weights, parts))


def causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, block: int = 512, kv_block: int = 256
) -> jax.Array:
    """Causal self-attention over a right-padded prompt.

    q: [B, T, Hq, d]; k, v: [B, T, Hkv, d]; lengths: [B] valid tokens. Returns [B, T, Hq, d].
    Prompts up to `block` tokens are one masked softmax. Longer ones (a multiple of
    `kv_block`) run in `kv_block`-sized query blocks that visit only the key blocks up to the
    diagonal with an online softmax: half the work of a full mask, a bounded score buffer.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    scale = 1.0 / jnp.sqrt(jnp.float32(d))
    qg = q.reshape(b, t, hkv, g, d).transpose(0, 2, 3, 1, 4).astype(jnp.float32) * scale
    kt = k.transpose(0, 2, 1, 3).astype(jnp.float32)  # [B, Hkv, T, d]
    vt = v.transpose(0, 2, 1, 3).astype(jnp.float32)
    if t <= block:
        pos = jnp.arange(t)
        mask = (pos[None, :, None] >= pos[None, None, :]) & (pos < lengths[:, None])[:, None, :]
        s = jnp.einsum("bhgqd,bhkd->bhgqk", qg, kt)
        s = jnp.where(mask[:, None, None], s, MASKED)
        out = jnp.einsum("bhgqk,bhkd->bhgqd", jax.nn.softmax(s, axis=-1), vt)
    else:
        if t % kv_block:
            raise ValueError(f"prompt length {t} must be a multiple of kv_block={kv_block}")
        out = _blocked_causal(qg, kt, vt, kv_block)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d).astype(q.dtype)


def _blocked_causal(qg, kt, vt, block):
    """Online-softmax causal attention in square blocks; qg [B, Hkv, G, T, d] pre-scaled.

    Only the diagonal block needs a mask: right padding sits after every valid query, so
    causality alone keeps valid queries off it (padded query rows stay finite, unused).
    """
    b, hkv, g, t, d = qg.shape
    offsets = jnp.arange(block)
    diagonal_mask = offsets[:, None] >= offsets[None, :]

    def query_block(i):
        qi = jax.lax.dynamic_slice_in_dim(qg, i * block, block, axis=3)

        def accumulate(carry, j, mask):
            m, l, acc = carry
            kj = jax.lax.dynamic_slice_in_dim(kt, j * block, block, axis=2)
            vj = jax.lax.dynamic_slice_in_dim(vt, j * block, block, axis=2)
            s = jnp.einsum("bhgqd,bhkd->bhgqk", qi, kj)
            if mask is not None:
                s = jnp.where(mask, s, MASKED)
            m_new = jnp.maximum(m, s.max(axis=-1))
            p = jnp.exp(s - m_new[..., None])
            correction = jnp.exp(m - m_new)
            l = l * correction + p.sum(axis=-1)
            acc = acc * correction[..., None] + jnp.einsum("bhgqk,bhkd->bhgqd", p, vj)
            return m_new, l, acc

        init = (
            jnp.full((b, hkv, g, block), MASKED, jnp.float32),
            jnp.zeros((b, hkv, g, block), jnp.float32),
            jnp.zeros((b, hkv, g, block, d), jnp.float32),
        )
        carry = jax.lax.fori_loop(0, i, lambda j, c: accumulate(c, j, None), init)
        _, l, acc = accumulate(carry, i, diagonal_mask)
        return acc / l[..., None]

    blocks = jax.lax.map(query_block, jnp.arange(t // block))  # [nb, B, Hkv, G, block, d]
    return blocks.transpose(1, 2, 3, 0, 4, 5).reshape(b, hkv, g, t, d)
