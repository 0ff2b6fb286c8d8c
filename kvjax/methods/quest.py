"""`Quest`: query-aware page selection from min/max key digests (ALGORITHMS.md section 2).

All KV stays on the device. Each query head scores every full page with the upper bound
`sum_d max(q*min, q*max)`, attends its top `budget/page_size - 1` pages, and always attends
the last (partial) page, which holds the most recent tokens and the current one.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import struct

import pallas_kernels as pk
from kvjax.attention import attention_part, current_token_part, merge_parts
from kvjax.cache import BATCH, HEADS, CacheSpec, axes
from kvjax.checks import check_count
from kvjax.methods.base import empty_kv, read_tokens, write_prompt, write_token
from kvjax.methods.sparse import SparseMethod
from kvjax.pages import add_token, full_pages, write_prompt_digests


@struct.dataclass
class PagedLayerCache:
    k: jax.Array = axes(BATCH, HEADS, None, None)  # [B, Hkv, S, d], slot == position, S a multiple of page_size
    v: jax.Array = axes(BATCH, HEADS, None, None)
    page_min: jax.Array = axes(BATCH, HEADS, None, None)  # [B, Hkv, S / page_size, d] float32
    page_max: jax.Array = axes(BATCH, HEADS, None, None)


@dataclasses.dataclass(frozen=True)
class Quest(SparseMethod):
    """Quest with `budget` tokens per query head: `budget/page_size - 1` pages + the last one."""

    budget: int = 1024
    page_size: int = 16
    dense_layers: int = 2
    impl: str = "xla"

    name = "quest"

    def check_hyperparameters(self) -> None:
        super().check_hyperparameters()
        check_count("page_size", self.page_size, 1)
        check_count("budget", self.budget, 2 * self.page_size)

    @property
    def top_pages(self) -> int:
        return self.budget // self.page_size - 1

    def slots(self, spec: CacheSpec) -> int:
        return self.page_size * math.ceil(spec.capacity / self.page_size)

    def sparse_init_cache(self, layer: int, spec: CacheSpec) -> PagedLayerCache:
        k, v = empty_kv(spec, self.slots(spec))
        pages = k.shape[2] // self.page_size
        shape = (spec.batch, spec.num_kv_heads, pages, spec.head_dim)
        return PagedLayerCache(k, v, jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))

    def sparse_ingest(self, layer, cache: PagedLayerCache, k, v, lengths):
        t = k.shape[1]
        new_k, new_v = write_prompt(cache.k, k), write_prompt(cache.v, v)
        t_pages = self.page_size * math.ceil(t / self.page_size)
        lo, hi = write_prompt_digests(cache.page_min, cache.page_max, new_k[:, :, :t_pages], lengths, self.page_size)
        return PagedLayerCache(new_k, new_v, lo, hi)

    def select_pages(self, q, cache: PagedLayerCache, lengths):
        """Top pages per query head among the full ones: (indices, valid) [B, Hq, top]."""
        num_pages = cache.page_min.shape[2]
        valid = full_pages(lengths, num_pages, self.page_size)[:, None, :]
        valid = jnp.broadcast_to(valid, cache.page_min.shape[:3])
        scores = pk.page_scores(q, cache.page_min, cache.page_max, valid, impl=self.impl)
        top = min(self.top_pages, num_pages)
        best, pages = jax.lax.top_k(scores, top)
        return pages, best > -jnp.inf

    def sparse_attend(self, layer, cache: PagedLayerCache, q, k, v, lengths):
        k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)
        pages, selected = self.select_pages(q, cache, lengths)
        chosen = pk.sparse_decode_attention(
            q, cache.k, cache.v, pages, selected, block_size=self.page_size, impl=self.impl
        )
        # The partial page: tokens of the current page before the current token.
        start = (lengths // self.page_size) * self.page_size
        partial_valid = start[:, None] + jnp.arange(self.page_size) < lengths[:, None]
        partial = attention_part(q, read_tokens(cache.k, start, self.page_size),
                                 read_tokens(cache.v, start, self.page_size), partial_valid)
        out = merge_parts([chosen, partial, current_token_part(q, k, v)])
        lo, hi = add_token(cache.page_min, cache.page_max, k, lengths, self.page_size)
        return out.astype(q.dtype), PagedLayerCache(
            write_token(cache.k, lengths, k), write_token(cache.v, lengths, v), lo, hi
        )
