"""Exact softmax attention with grouped query heads, for prefill and for one decode step.

Scores and the softmax are computed in float32 whatever the cache dtype; the scale is
`1/sqrt(d)`. Query heads are grouped by KV head: `q` `[..., Hq, d]` is viewed as
`[..., Hkv, G, d]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Masked scores use a large finite negative instead of -inf so that a fully masked row stays
# finite (padding rows) instead of producing NaN.
MASKED = -1e30


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
    if current is None:
        p = jax.nn.softmax(s, axis=-1)
        out = jnp.einsum("bhgs,bhsd->bhgd", p, v.astype(jnp.float32))
        return out.reshape(b, hq, d).astype(q.dtype)
    k_cur, v_cur = (x.astype(jnp.float32) for x in current)
    s_cur = jnp.einsum("bhgd,bhd->bhg", qg, k_cur) * scale
    m = jnp.maximum(s.max(axis=-1), s_cur)
    p = jnp.exp(s - m[..., None])
    p_cur = jnp.exp(s_cur - m)
    out = jnp.einsum("bhgs,bhsd->bhgd", p, v.astype(jnp.float32)) + p_cur[..., None] * v_cur[:, :, None]
    out = out / (p.sum(axis=-1) + p_cur)[..., None]
    return out.reshape(b, hq, d).astype(q.dtype)


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
