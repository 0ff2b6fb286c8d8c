"""`FreeKV`: speculative, group-consistent page retrieval (ALGORITHMS.md section 4).

Pages are `page_size` consecutive positions (page `j` holds `[j * P, (j + 1) * P)`); every
full page has a min/max key digest per KV head (`kvjax.pages`). At a decode step with `L`
cached tokens (the current token sits at position `L`, in page `L // P`):

- **recent** pages are the last `recent / P` pages *counting the page of the current token*:
  pages `r0 .. L // P` with `r0 = max(0, L // P - recent / P + 1)`. The recent region is
  positions `[r0 * P, L)` plus the current token, at most `recent` tokens in all.
- **sink** positions are `[0, min(sink, r0 * P))` (short contexts: the recent region wins
  the overlap, nothing is attended twice).
- **candidates** are the pages `j` with `sink / P <= j < r0`: full pages that are neither
  sink nor recent pages.
- **selection** (group-consistent): each query head scores the candidates with Quest's bound,
  takes a softmax over them, the scores are averaged over the head's query group, and each KV
  head keeps its top `k = (budget - sink - recent) / P` candidates. All query heads of a group
  attend the same pages.

Attended set per KV head: sink positions + the selected pages + the recent region (+ the
current token, exactly once): at most `budget` tokens.

**Speculative retrieval.** After attending at step `t` the layer selects the pages of step
`t + 1` with `q_t` (against the candidates and digests of step `t + 1`: the token written at
step `t` completes the only page that can join them) and keeps that selection and `q_t` in
the cache. Step `t + 1` attends that speculative selection, except for the KV heads whose
query moved: `c = mean_g cos(q_{t+1}[g], q_t[g]) < tau` re-selects that head with
`q_{t+1}` (a correction, counted per sequence and KV head). The first decode step after a
prefill has no previous query and selects with its own query (not counted as a
correction). `speculative=False` always selects with the current query.

**Offload** (`offload=True`, items 5, 6 and 8; same outputs as `offload=False`): the device
holds a fixed `[B, Hkv, budget, d]` slot buffer per layer: the sink positions, `k` retrieved
page slots and a ring of `recent / P` page slots (page `j` in ring slot `j mod recent/P`),
whatever the context length. Every page lives in a host pool `[B, pages, Hkv, 2, P, d]`
(pinned_host, head-major: one (page, head) K+V block is one contiguous copy); prompt pages are
written to it at ingest and each decoded token is written to it as it is produced, so a page
is complete in the pool the moment it fills and becomes a candidate. `slot_page` maps each
retrieved slot to its page per (sequence, KV head) (the page -> slot direction is the `k x k`
comparison of the selection against it). A step copies only the selected pages that are not
resident (one dynamic-size loop of block copies, `GATHER_PAGES` pages per head each), into the slots of the lowest-scoring
resident pages that are not selected; `recalled` counts the copied pages. Device slots are
head-major `[B, Hkv, slots, d]` (the layout of every other cache here) rather than the
paper's token-major layout. The digests (`[B, Hkv, pages, d]`) stay on the device.

**Streamed recall** (item 7, speculative offload): as soon as a layer has selected the pages
of step `t + 1` (with `q_t`, after attending at step `t`) it copies the ones that are not
resident into a staging buffer in the cache (`staged`, with its destinations and the slot
map it implies). Step `t + 1` first scatters those blocks into their slots, then corrects
the heads whose query moved (copying only what is still missing, synchronously) and attends.
The copy and its consumer are ordinary data dependencies of the jitted decode loop: XLA may
run the host -> device copy while the following layers of step `t` and the earlier layers of
step `t + 1` compute, and no slot is read before its block is written. The staging buffer
holds `prefetch_pages` pages per KV head (default `k / 4`: consecutive selections share most
pages, and the buffer is device memory beyond the `budget` slots); pages that do not fit are
recalled by the consuming step itself. The loop carries one staging buffer per layer: the
one a step consumes and the one it fills are distinct values (the double buffer); whether
they share memory is XLA's choice, and they cannot where the copy overlaps the consumer.
`prefetched` counts the pages copied ahead (a share of `recalled`); a mispredicted head's
staged pages are copied in vain and counted like any other.
`speculative=False` keeps the synchronous recall only.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

import pallas_kernels as pk
from kvjax.attention import attention_part, current_token_part, merge_parts
from kvjax.cache import BATCH, HEADS, CacheSpec, axes
from kvjax.checks import check_count
from kvjax.compat import conditionals_sync_host, from_host_bits, host_bits, host_take_rows, to_host
from kvjax.methods.base import (
    empty_kv,
    prefix_sum,
    read_tokens,
    to_head_major,
    write_prompt,
    write_token,
)
from kvjax.methods.sparse import SparseMethod
from kvjax.pages import add_token, write_prompt_digests

GATHER_PAGES = 4  # pages per (sequence, KV head) in one host -> device copy of the offload recall


@struct.dataclass
class FreeKVLayerCache:
    # offload=False: [B, Hkv, S, d], slot == position, S a multiple of page_size.
    # offload=True: the device slots [B, Hkv, budget, d]: sink pages, k retrieved page slots,
    # the recent ring (page j in ring slot j mod recent/page_size).
    k: jax.Array = axes(BATCH, HEADS, None, None)
    v: jax.Array = axes(BATCH, HEADS, None, None)
    page_min: jax.Array = axes(BATCH, HEADS, None, None)  # [B, Hkv, S / page_size, d] float32
    page_max: jax.Array = axes(BATCH, HEADS, None, None)
    prev_q: jax.Array = axes(BATCH, HEADS, None)  # [B, Hq, d] float32: the query of the previous decode step
    has_prev: jax.Array = axes(BATCH)  # [B] bool: prev_q and next_pages are set (false after a prefill)
    next_pages: jax.Array = axes(BATCH, HEADS, None)  # [B, Hkv, k] int32: pages selected with prev_q for this step
    next_valid: jax.Array = axes(BATCH, HEADS, None)  # [B, Hkv, k] bool
    next_scores: jax.Array = axes(BATCH, HEADS, None)  # [B, Hkv, S / page_size] float32 group scores of that selection
    # Counters read by `decode_stats` are replicated (no `axes`): every process reads them whole.
    corrections: jax.Array  # [B, Hkv] int32: heads re-selected with the current query
    checks: jax.Array  # [B] int32: decode steps that had a previous query (speculation tried)
    # offload=True only (None otherwise):
    # [B, Hkv, k] int32 page held by each retrieved slot, -1 empty
    slot_page: jax.Array | None = axes(BATCH, HEADS, None, default=None)
    # [B, S / page_size, Hkv, 2, page_size, d] pinned_host: every page (`host_bits`)
    pool: jax.Array | None = axes(BATCH, None, HEADS, None, None, None, default=None)
    recalled: jax.Array | None = None  # [B, Hkv] int32 pages copied host -> device so far
    # offload=True with speculative=True: the recall for the next step, issued by this one.
    prefetched: jax.Array | None = None  # [B, Hkv] int32: of `recalled`, pages copied ahead
    # [B, Hkv, staged_pages, 2, page_size, d] blocks copied for the next step
    staged: jax.Array | None = axes(BATCH, HEADS, None, None, None, None, default=None)
    # [B, Hkv, staged_pages] int32 first slot of each staged block; `budget`: unused
    staged_at: jax.Array | None = axes(BATCH, HEADS, None, default=None)
    # [B, Hkv, k] slot_page once `staged` is in place
    staged_slot_page: jax.Array | None = axes(BATCH, HEADS, None, default=None)
    staged_count: jax.Array | None = axes(BATCH, HEADS, default=None)  # [B, Hkv] int32 pages in `staged`


@dataclasses.dataclass(frozen=True)
class FreeKV(SparseMethod):
    """FreeKV with `budget = sink + k * page_size + recent` tokens per KV head."""

    budget: int = 2048
    page_size: int = 32
    sink: int = 512
    recent: int = 512
    tau: float = 0.8
    dense_layers: int = 1
    speculative: bool = True
    offload: bool = False
    prefetch_pages: int | None = None
    impl: str = "xla"

    name = "freekv"

    def check_hyperparameters(self) -> None:
        super().check_hyperparameters()
        check_count("page_size", self.page_size, 1)
        check_count("sink", self.sink, 0)
        check_count("recent", self.recent, self.page_size)
        for name in ("sink", "recent"):
            if getattr(self, name) % self.page_size:
                raise ValueError(
                    f"{name} must be a multiple of page_size={self.page_size}, got {getattr(self, name)}"
                )
        check_count("budget", self.budget, self.sink + self.recent + self.page_size)
        if (self.budget - self.sink - self.recent) % self.page_size:
            raise ValueError(
                f"budget must be sink + recent + k * page_size with k >= 1 "
                f"(sink={self.sink}, recent={self.recent}, page_size={self.page_size}), got {self.budget}"
            )
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not 0 < self.tau <= 1:
            raise ValueError(f"tau must be a number in (0, 1], got {self.tau!r}")
        if self.prefetch_pages is not None:
            check_count("prefetch_pages", self.prefetch_pages, 1)
        for name in ("speculative", "offload"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def staged_pages(self) -> int:
        """Pages per KV head the streamed recall can stage (`prefetch_pages`, default k / 4)."""
        limit = max(1, self.top_pages // 4) if self.prefetch_pages is None else self.prefetch_pages
        return min(limit, self.top_pages)

    @property
    def top_pages(self) -> int:
        """k: retrieved pages per KV head."""
        return (self.budget - self.sink - self.recent) // self.page_size

    def slots(self, spec: CacheSpec) -> int:
        return self.page_size * math.ceil(spec.capacity / self.page_size)

    def decode_stats(self, cache) -> dict:
        stats = correction_stats(cache.layers)
        layers = [x for x in cache.layers if isinstance(x, FreeKVLayerCache) and x.recalled is not None]
        if layers:
            recalled = sum(int(np.asarray(x.recalled).sum()) for x in layers)
            stats["freekv_pages_recalled"] = recalled
            if self.speculative:
                ahead = sum(int(np.asarray(x.prefetched).sum()) for x in layers)
                stats["freekv_prefetched_share"] = ahead / recalled if recalled else None
        return stats

    # ------------------------------------------------------------------------------------
    # Cache

    def sparse_init_cache(self, layer: int, spec: CacheSpec) -> FreeKVLayerCache:
        b, hkv, d = spec.batch, spec.num_kv_heads, spec.head_dim
        num_pages = self.slots(spec) // self.page_size
        digest = (b, hkv, num_pages, d)  # distinct buffers: the cache is donated
        top = min(self.top_pages, num_pages)
        state = dict(
            page_min=jnp.zeros(digest, jnp.float32),
            page_max=jnp.zeros(digest, jnp.float32),
            prev_q=jnp.zeros((b, spec.num_heads, d), jnp.float32),
            has_prev=jnp.zeros((b,), bool),
            next_pages=jnp.zeros((b, hkv, top), jnp.int32),
            next_valid=jnp.zeros((b, hkv, top), bool),
            next_scores=jnp.zeros((b, hkv, num_pages), jnp.float32),
            corrections=jnp.zeros((b, hkv), jnp.int32),
            checks=jnp.zeros((b,), jnp.int32),
        )
        if not self.offload:
            return FreeKVLayerCache(*empty_kv(spec, self.slots(spec)), **state)
        pool = (b, num_pages, hkv, 2, self.page_size, d)
        cache = FreeKVLayerCache(
            *empty_kv(spec, self.budget), **state,
            slot_page=jnp.full((b, hkv, self.top_pages), -1, jnp.int32),
            pool=to_host(host_bits(jnp.zeros(pool, spec.dtype))),
            recalled=jnp.zeros((b, hkv), jnp.int32),
        )
        if not self.speculative:
            return cache
        return cache.replace(
            prefetched=jnp.zeros((b, hkv), jnp.int32),
            staged=jnp.zeros((b, hkv, self.staged_pages, 2, self.page_size, d), spec.dtype),
            **self._no_staging(cache.slot_page),
        )

    def _no_staging(self, slot_page: jax.Array) -> dict:
        """Staging fields that stage nothing (after a prefill, or with nothing to prefetch)."""
        return dict(
            staged_at=jnp.full((*slot_page.shape[:2], self.staged_pages), self.budget, jnp.int32),
            staged_slot_page=slot_page,
            staged_count=jnp.zeros(slot_page.shape[:2], jnp.int32),
        )

    def sparse_ingest(self, layer, cache: FreeKVLayerCache, k, v, lengths):
        """Write the prompt and its digests; a new request forgets the previous query."""
        t, p = k.shape[1], self.page_size
        t_pages = p * math.ceil(t / p)
        reset = dict(
            prev_q=jnp.zeros_like(cache.prev_q),
            has_prev=jnp.zeros_like(cache.has_prev),
            next_valid=jnp.zeros_like(cache.next_valid),
            corrections=jnp.zeros_like(cache.corrections),
            checks=jnp.zeros_like(cache.checks),
        )
        if self.offload:
            return self._offload_ingest(cache, k, v, lengths).replace(**reset)
        new_k, new_v = write_prompt(cache.k, k), write_prompt(cache.v, v)
        lo, hi = write_prompt_digests(cache.page_min, cache.page_max, new_k[:, :, :t_pages], lengths, p)
        return cache.replace(k=new_k, v=new_v, page_min=lo, page_max=hi, **reset)

    # ------------------------------------------------------------------------------------
    # Regions and selection

    def recent_start(self, lengths: jax.Array) -> jax.Array:
        """r0 [B]: first recent page when `lengths` tokens are cached (current token at L)."""
        return jnp.maximum(lengths // self.page_size - self.recent // self.page_size + 1, 0)

    def candidates(self, lengths: jax.Array, num_pages: int) -> jax.Array:
        """[B, P] bool: full pages that are neither sink nor recent pages."""
        j = jnp.arange(num_pages)[None, :]
        return (j >= self.sink // self.page_size) & (j < self.recent_start(lengths)[:, None])

    def page_bounds(self, q, page_min, page_max, lengths):
        """Quest's bound [B, Hq, P] of every candidate page of `lengths` cached tokens for
        query `q` (-inf for the other pages)."""
        b, hkv, num_pages, _ = page_min.shape
        valid = jnp.broadcast_to(self.candidates(lengths, num_pages)[:, None, :], (b, hkv, num_pages))
        return pk.page_scores(q, page_min, page_max, valid, impl=self.impl)

    def rank_pages(self, bounds, num_kv_heads: int, lengths):
        """Group-consistent top-k among the candidates of `lengths` cached tokens, from page
        bounds [B, Hq, P] (those of a superset of the candidates will do): (pages, valid)
        [B, Hkv, k] and the group scores [B, Hkv, P] (-inf for non-candidates)."""
        b, hq, num_pages = bounds.shape
        group_size = hq // num_kv_heads
        valid = jnp.broadcast_to(self.candidates(lengths, num_pages)[:, None, :], (b, num_kv_heads, num_pages))
        scores = jnp.where(jnp.repeat(valid, group_size, axis=1), bounds, -jnp.inf)
        # Softmax over the candidates per query head (a row without candidates gives zeros).
        top = scores.max(axis=-1, keepdims=True)
        e = jnp.exp(scores - jnp.where(jnp.isfinite(top), top, 0.0))
        p = e / jnp.maximum(e.sum(axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
        group = p.reshape(b, num_kv_heads, group_size, num_pages).mean(axis=2)
        group = jnp.where(valid, group, -jnp.inf)
        best, pages = jax.lax.top_k(group, min(self.top_pages, num_pages))
        return pages.astype(jnp.int32), best > -jnp.inf, group

    def select_pages(self, q, page_min, page_max, lengths):
        """Group-consistent top-k candidates per KV head for query `q`: (pages, valid)
        [B, Hkv, k] and the group scores [B, Hkv, P] (-inf for non-candidates)."""
        return self.rank_pages(self.page_bounds(q, page_min, page_max, lengths), page_min.shape[1], lengths)

    def corrected_heads(self, cache: FreeKVLayerCache, q) -> jax.Array:
        """[B, Hkv] bool: heads that select with the current query this step."""
        b, hq, d = q.shape
        hkv = cache.next_pages.shape[1]
        if not self.speculative:
            return jnp.ones((b, hkv), bool)
        qf = q.astype(jnp.float32)
        norm = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-30)
        cos = (norm(qf) * norm(cache.prev_q)).sum(axis=-1)  # [B, Hq]
        c = cos.reshape(b, hkv, hq // hkv).mean(axis=-1)
        return (c < self.tau) | ~cache.has_prev[:, None]

    def choose_pages(self, cache: FreeKVLayerCache, q, lengths, bounds):
        """This step's retrieved pages: (pages, valid [B, Hkv, k], group scores, corrected).

        `bounds`: the page bounds of `q` (`page_bounds`) over the candidates of this step or
        of the next one (which include them), shared with the next step's selection."""
        corrected = self.corrected_heads(cache, q)
        hkv = cache.next_pages.shape[1]
        if not self.speculative:
            return (*self.rank_pages(bounds, hkv, lengths), corrected)

        def reselect(_):
            fresh = self.rank_pages(bounds, hkv, lengths)
            spec = (cache.next_pages, cache.next_valid, cache.next_scores)
            return tuple(jnp.where(corrected[..., None], f, s) for f, s in zip(fresh, spec))

        if conditionals_sync_host():  # re-select every step: cheaper on a GPU than a conditional
            return (*reselect(None), corrected)
        chosen = jax.lax.cond(
            corrected.any(), reselect, lambda _: (cache.next_pages, cache.next_valid, cache.next_scores), None
        )
        return (*chosen, corrected)

    # ------------------------------------------------------------------------------------
    # Decode

    def sparse_attend(self, layer, cache: FreeKVLayerCache, q, k, v, lengths):
        k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)
        if self.offload and self.speculative:
            cache = self._apply_staged(cache)
        lo, hi = add_token(cache.page_min, cache.page_max, k, lengths, self.page_size)
        # This query's page bounds serve this step's selection (corrected heads) and the
        # next step's speculative one: scored once over the next step's candidates, which
        # include this step's, with the current token folded into its page's digests (that
        # page is no candidate this step, and its digest is what the next step reads).
        bounds = self.page_bounds(q, lo, hi, lengths + 1 if self.speculative else lengths)
        pages, selected, scores, corrected = self.choose_pages(cache, q, lengths, bounds)
        if self.offload:
            out, new = self._offload_attend(cache, q, k, v, lengths, pages, selected, scores)
        else:
            out, new = self._device_attend(cache, q, k, v, lengths, pages, selected)
        new = new.replace(page_min=lo, page_max=hi)
        if self.speculative:
            # Speculative selection for the next step, with this step's query.
            next_pages, next_valid, next_scores = self.rank_pages(bounds, cache.k.shape[1], lengths + 1)
            new = new.replace(
                prev_q=q.astype(jnp.float32),
                has_prev=jnp.ones_like(cache.has_prev),
                next_pages=next_pages,
                next_valid=next_valid,
                next_scores=next_scores,
                corrections=cache.corrections + (corrected & cache.has_prev[:, None]).astype(jnp.int32),
                checks=cache.checks + cache.has_prev.astype(jnp.int32),
            )
            if self.offload:
                # Pages from the current token's page on are not complete in the pool before
                # `_write_pool`: the next step recalls those itself (only with recent == P can
                # such a page be a candidate at all).
                complete = next_pages < (lengths // self.page_size)[:, None, None]
                new = self._stage(new, next_pages, next_valid & complete, next_scores)
        if self.offload:
            new = self._write_pool(new, k, v, lengths)
        return out.astype(q.dtype), new

    def _device_attend(self, cache, q, k, v, lengths, pages, selected):
        """All pages on the device: gather the selected pages, slice sinks and recent."""
        hq, hkv, p = q.shape[1], cache.k.shape[1], self.page_size
        group = hq // hkv
        chosen = pk.sparse_decode_attention(
            q, cache.k, cache.v, jnp.repeat(pages, group, axis=1), jnp.repeat(selected, group, axis=1),
            block_size=p, impl=self.impl,
        )
        r0 = self.recent_start(lengths) * p  # first recent position
        parts = [chosen]
        if self.sink:
            sink_valid = jnp.arange(self.sink)[None, :] < jnp.minimum(r0, self.sink)[:, None]
            parts.append(attention_part(q, cache.k[:, :, : self.sink], cache.v[:, :, : self.sink], sink_valid))
        recent_valid = r0[:, None] + jnp.arange(self.recent)[None, :] < lengths[:, None]
        parts.append(attention_part(q, read_tokens(cache.k, r0, self.recent),
                                    read_tokens(cache.v, r0, self.recent), recent_valid))
        parts.append(current_token_part(q, k, v))
        new = cache.replace(k=write_token(cache.k, lengths, k), v=write_token(cache.v, lengths, v))
        return merge_parts(parts), new

    # ------------------------------------------------------------------------------------
    # Offload (ALGORITHMS.md section 4 items 5, 6, 8): device slots + host pool

    def _ring_positions(self, lengths):
        """[B, recent] position held by each recent-ring slot (ring page s holds page
        r0 + ((s - r0) mod R) of the recent pages r0 .. L // P)."""
        p, nr = self.page_size, self.recent // self.page_size
        r0 = self.recent_start(lengths)[:, None]
        s = jnp.arange(nr)[None, :]
        page = r0 + jnp.mod(s - r0, nr)  # [B, R]
        return (page[:, :, None] * p + jnp.arange(p)).reshape(lengths.shape[0], self.recent)

    def _offload_ingest(self, cache, k, v, lengths):
        b, t, hkv, d = k.shape
        p = self.page_size
        t_pages = p * math.ceil(t / p)
        if t_pages > cache.pool.shape[1] * p:
            raise ValueError(f"prompt of {t} tokens exceeds the cache capacity {cache.pool.shape[1] * p}")
        kh, vh = (jnp.pad(to_head_major(x, cache.k.dtype), ((0, 0), (0, 0), (0, t_pages - t), (0, 0)))
                  for x in (k, v))
        lo, hi = write_prompt_digests(cache.page_min, cache.page_max, kh, lengths, p)
        # Host pool, head-major [B, pages, Hkv, 2, P, d]: the head-major conversion happens on
        # the device, the copy is one contiguous block per sequence.
        blocks = jnp.stack([kh, vh], axis=2).reshape(b, hkv, 2, t_pages // p, p, d).transpose(0, 3, 1, 2, 4, 5)
        pool = jax.lax.dynamic_update_slice(cache.pool, to_host(host_bits(blocks)), (0, 0, 0, 0, 0, 0))
        # Device slots: sinks (slot == position) and the recent ring.
        ring = jnp.clip(self._ring_positions(lengths), 0, t_pages - 1)[:, None, :, None]  # [B, 1, R, 1]
        ring = jnp.broadcast_to(ring, (b, hkv, self.recent, 1))
        ring0 = self.budget - self.recent
        n_sink = min(self.sink, t_pages)

        def fill(buf, src):
            buf = buf.at[:, :, :n_sink].set(src[:, :, :n_sink])
            return buf.at[:, :, ring0:].set(jnp.take_along_axis(src, ring, axis=2))

        cache = cache.replace(
            k=fill(cache.k, kh), v=fill(cache.v, vh), pool=pool, page_min=lo, page_max=hi,
            slot_page=jnp.full_like(cache.slot_page, -1),
            recalled=jnp.zeros_like(cache.recalled),
        )
        if not self.speculative:
            return cache
        return cache.replace(prefetched=jnp.zeros_like(cache.prefetched), **self._no_staging(cache.slot_page))

    def _plan(self, slot_page, pages, selected, scores, limit: int | None = None):
        """Where the selected pages that are not resident go: the slots of the lowest-scoring
        resident pages that are not selected (free slots first). With `limit`, only the first
        `limit` missing pages per head are planned (the rest stay missing).

        Returns (slot_page once they are in, missing [B, Hkv, k] bool, target slot [B, Hkv, k])."""
        top = slot_page.shape[2]
        b, hkv = slot_page.shape[:2]
        hit = (slot_page[:, :, None, :] == pages[..., None]) & selected[..., None]  # [B, Hkv, sel, slot]
        missing = selected & ~hit.any(axis=3)
        needed = hit.any(axis=2)
        resident_score = jnp.take_along_axis(scores, jnp.maximum(slot_page, 0), axis=2)
        key = jnp.where(needed, jnp.inf, jnp.where(slot_page < 0, -jnp.inf, resident_score))
        _, victims = jax.lax.top_k(-key, top)
        rank = prefix_sum(missing.astype(jnp.int32)) - 1
        if limit is not None:
            missing = missing & (rank < limit)
        target = jnp.take_along_axis(victims, jnp.maximum(rank, 0), axis=2)  # [B, Hkv, sel]
        rows, heads = jnp.arange(b)[:, None, None], jnp.arange(hkv)[None, :, None]
        slot_page = slot_page.at[rows, heads, jnp.where(missing, target, top)].set(pages, mode="drop")
        return slot_page, missing, target

    def _gather(self, pool, pages, missing, target, dtype, n: int):
        """Copy exactly the missing (sequence, head, page) blocks host -> device, compacted
        per (sequence, KV head) into `n` entries (at least the number missing per head).

        Returns (blocks [B, Hkv, n, 2, P, d], first slot [B, Hkv, n] int32: `budget` for the
        unused tail). Each copy takes `GATHER_PAGES` pages of every (sequence, KV head) at
        once, as many times as the head with the most missing pages needs (a loop whose
        trip count is data-dependent: every iteration costs a CPU a few copy and update
        operations and a GPU a host sync, so pages go in groups). The gather is batched over
        (sequence, KV head), so that on a mesh each device copies from its own shard of the
        pool (an index into the whole pool made XLA gather the pool onto every device)."""
        p = self.page_size
        group = min(n, GATHER_PAGES)
        padded = group * -(-n // group)
        rank = prefix_sum(missing.astype(jnp.int32)) - 1
        compact = jax.vmap(jax.vmap(lambda at, x: jnp.zeros(padded, jnp.int32).at[at].set(x, mode="drop")))
        order = compact(jnp.where(missing, rank, padded), jnp.broadcast_to(jnp.arange(pages.shape[2]), pages.shape))
        copied = jnp.arange(n) < missing.sum(axis=2, keepdims=True)  # [B, Hkv, n]
        block_pages = jnp.take_along_axis(pages, order, axis=2)

        def copy(i, stage):
            some = jax.lax.dynamic_slice_in_dim(block_pages, i * group, group, axis=2)  # [B, Hkv, group]
            return jax.lax.dynamic_update_slice_in_dim(stage, host_take_rows(pool, some, head_axis=2), i * group, axis=2)

        stage = jnp.zeros((*pages.shape[:2], padded, 2, p, pool.shape[-1]), pool.dtype)
        copies = (jnp.max(rank[..., -1]) + group) // group  # ceil(most missing / group)
        blocks = from_host_bits(jax.lax.fori_loop(0, copies, copy, stage)[:, :, :n], dtype)
        slot = jnp.where(copied, self.sink + jnp.take_along_axis(target, order[..., :n], axis=2) * p, self.budget)
        return blocks, slot

    def _scatter(self, k, v, blocks, at):
        """Write gathered blocks [B, Hkv, n, 2, P, d] into their slots (first slots `at`
        [B, Hkv, n]; token-major within each page slot), per (sequence, KV head)."""
        b, hkv, n = at.shape
        slot = (at[..., None] + jnp.arange(self.page_size)).reshape(b, hkv, -1)  # unused entries: dropped
        put = jax.vmap(jax.vmap(lambda buf, s, x: buf.at[s].set(x, mode="drop")))
        tokens = lambda kv: blocks[:, :, :, kv].reshape(b, hkv, n * self.page_size, -1)
        return put(k, slot, tokens(0)), put(v, slot, tokens(1))

    def _recall(self, cache, pages, selected, scores):
        """Make the selected pages resident, copying only the missing ones (synchronously).

        Returns (k slots, v slots, slot_page, attended [B, Hkv, k] slot holds a selected
        page, copied [B, Hkv] pages copied)."""
        slot_page, missing, target = self._plan(cache.slot_page, pages, selected, scores)
        blocks, at = self._gather(cache.pool, pages, missing, target, cache.k.dtype, pages.shape[2])
        new_k, new_v = self._scatter(cache.k, cache.v, blocks, at)
        attended = ((slot_page[:, :, None, :] == pages[..., None]) & selected[..., None]).any(axis=2)
        return new_k, new_v, slot_page, attended, missing.sum(axis=2).astype(jnp.int32)

    def _apply_staged(self, cache):
        """The consuming side of the prefetch: scatter the blocks the previous step staged
        into their slots and adopt its slot map (a data dependency of this step's recall and
        attention, so nothing reads a slot before its block is in)."""
        k, v = self._scatter(cache.k, cache.v, cache.staged, cache.staged_at)
        return cache.replace(
            k=k, v=v, slot_page=cache.staged_slot_page,
            recalled=cache.recalled + cache.staged_count,
            prefetched=cache.prefetched + cache.staged_count,
        )

    def _stage(self, cache, pages, selected, scores):
        """The issuing side: copy the next step's speculative pages that are not resident into
        the staging buffer now (the slots still serve this step; they are written next step).
        At most `prefetch_pages` per head: the consuming step recalls any others itself."""
        limit = self.staged_pages
        slot_page, missing, target = self._plan(cache.slot_page, pages, selected, scores, limit)
        blocks, at = self._gather(cache.pool, pages, missing, target, cache.k.dtype, cache.staged.shape[2])
        return cache.replace(staged=blocks, staged_at=at, staged_slot_page=slot_page,
                             staged_count=missing.sum(axis=2).astype(jnp.int32))

    def _offload_attend(self, cache, q, k, v, lengths, pages, selected, scores):
        p = self.page_size
        b, hkv = cache.k.shape[:2]
        new_k, new_v, slot_page, attended, copied = self._recall(cache, pages, selected, scores)
        r0 = self.recent_start(lengths) * p
        sink_valid = jnp.arange(self.sink)[None, :] < jnp.minimum(r0, self.sink)[:, None]
        ring_valid = self._ring_positions(lengths) < lengths[:, None]
        valid = jnp.concatenate([
            jnp.broadcast_to(sink_valid[:, None], (b, hkv, self.sink)),
            jnp.repeat(attended, p, axis=2),
            jnp.broadcast_to(ring_valid[:, None], (b, hkv, self.recent)),
        ], axis=2)
        out = merge_parts([attention_part(q, new_k, new_v, valid), current_token_part(q, k, v)])

        # Write the current token: its recent-ring slot and its sink slot (short prompts).
        nr, ring0 = self.recent // p, self.budget - self.recent
        page, offset = lengths // p, lengths % p
        ring_slot = ring0 + (page % nr) * p + offset
        sink_slot = jnp.where(lengths < self.sink, lengths, self.budget)  # out of range: dropped
        for slot in (ring_slot, sink_slot):
            new_k, new_v = write_token(new_k, slot, k), write_token(new_v, slot, v)
        return out, cache.replace(k=new_k, v=new_v, slot_page=slot_page, recalled=cache.recalled + copied)

    def _write_pool(self, cache, k, v, lengths):
        """Append the current token to its page in the host pool (one small copy per sequence).

        Done last in a step: reading the pool after this write (to stage the next step's
        pages) made XLA copy the whole pool every step, which cost more than the copies."""
        page, offset = lengths // self.page_size, lengths % self.page_size
        pool = cache.pool
        token = jnp.stack([k, v], axis=2)  # [B, Hkv, 2, d]
        for row in range(k.shape[0]):
            update = to_host(host_bits(token[row][None, None, :, :, None, :]))
            pool = jax.lax.dynamic_update_slice(pool, update, (row, page[row], 0, 0, offset[row], 0))
        return cache.replace(pool=pool)


def correction_stats(layers) -> dict:
    """Correction rate per FreeKV layer: corrected heads / speculative head-steps (None for
    dense layers and layers without a speculative step yet)."""
    rates, total, tried = [], 0, 0
    for layer in layers:
        if not isinstance(layer, FreeKVLayerCache):
            rates.append(None)
            continue
        corrections = int(np.asarray(layer.corrections).sum())
        checks = int(np.asarray(layer.checks).sum()) * layer.corrections.shape[1]
        rates.append(corrections / checks if checks else None)
        total, tried = total + corrections, tried + checks
    return {
        "freekv_correction_rate": total / tried if tried else None,
        "freekv_correction_rate_per_layer": rates,
    }
