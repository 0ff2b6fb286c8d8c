"""Page digests: element-wise min/max of the keys of each page (Quest, FreeKV).

Keys are head-major `[B, Hkv, S, d]`; page `j` holds slots `[j * page_size, (j + 1) *
page_size)`. Only full pages are scored; the digests of the page being filled are kept up to
date token by token so it is ready the moment it fills.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.methods.base import read_tokens, write_token


def prompt_digests(k: jax.Array, lengths: jax.Array, page_size: int) -> tuple[jax.Array, jax.Array]:
    """Digests of a right-padded prompt's pages: k [B, Hkv, T, d] (T a multiple of
    page_size), lengths [B] -> (min, max) [B, Hkv, T / page_size, d] float32. Padding is
    ignored; a page with no valid token gets zeros."""
    b, h, t, d = k.shape
    valid = (jnp.arange(t) < lengths[:, None])[:, None, :, None]
    kf = k.astype(jnp.float32)
    pages = lambda x: x.reshape(b, h, t // page_size, page_size, d)
    lo = pages(jnp.where(valid, kf, jnp.inf)).min(axis=3)
    hi = pages(jnp.where(valid, kf, -jnp.inf)).max(axis=3)
    seen = pages(jnp.broadcast_to(valid, kf.shape)).any(axis=3)
    return jnp.where(seen, lo, 0.0), jnp.where(seen, hi, 0.0)


def write_prompt_digests(
    page_min: jax.Array, page_max: jax.Array, k: jax.Array, lengths: jax.Array, page_size: int
) -> tuple[jax.Array, jax.Array]:
    """Store the digests of a right-padded prompt's pages (`prompt_digests` of k [B, Hkv, T,
    d], T a multiple of page_size) in the first pages of the digest buffers."""
    lo, hi = prompt_digests(k, lengths, page_size)
    return page_min.at[:, :, : lo.shape[2]].set(lo), page_max.at[:, :, : hi.shape[2]].set(hi)


def add_token(
    page_min: jax.Array, page_max: jax.Array, k: jax.Array, position: jax.Array, page_size: int
) -> tuple[jax.Array, jax.Array]:
    """Fold one key per sequence into its page's digest: k [B, Hkv, d], position [B]."""
    page = position // page_size
    first = (position % page_size == 0)[:, None, None]
    kf = k.astype(jnp.float32)

    def fold(digest, combine):
        old = read_tokens(digest, page, 1)[:, :, 0]  # [B, Hkv, d]
        return write_token(digest, page, jnp.where(first, kf, combine(old, kf)))

    return fold(page_min, jnp.minimum), fold(page_max, jnp.maximum)


def full_pages(lengths: jax.Array, num_pages: int, page_size: int) -> jax.Array:
    """[B, P] bool: pages entirely made of the `lengths` cached tokens."""
    return jnp.arange(num_pages)[None, :] < (lengths // page_size)[:, None]
