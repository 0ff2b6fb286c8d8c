"""`ClusterKV`: recall whole semantic clusters of keys (ALGORITHMS.md section 3).

Per sparse layer and KV head the prompt's keys after the `sink` first tokens are clustered
with cosine K-means (`ceil(n / tokens_per_cluster)` clusters). The index keeps the token
positions sorted by (cluster, position) with each cluster's size, so a cluster is a
contiguous run of the sorted positions; the KV buffers hold the clustered tokens in that same
order (slot `sink + i` holds the token at `order[i]`), so recalling a cluster reads one
contiguous run of the cache instead of scattered rows (5-8x faster gathers on CPU, and
contiguous copies for host recall). At a decode step each query head scores the
centroids by raw dot product, ranks them with an exact sort and fills `budget - sink` slots
with whole clusters in rank order (the last one truncated to its lowest positions). Tokens
generated after the prompt form a window that is always attended; every `window` tokens it is
clustered into `window_clusters` clusters appended to the index.

Attended set per query head: sinks + selected tokens + window + the current token.

**Recall from host** (`offload=True`, section 3 item 7): the clustered tokens live in host
memory (`pinned_host`), in the same index order (16-bit floats as their uint16 bits,
`kvjax.compat.host_bits`: copies read no bfloat16 on the host). The device keeps the sinks,
the window, the index (centroids, sizes, order: small) and a recall buffer of `budget - sink`
slots per recall head (each query head; each KV head with `selection="kv_head"`) holding the
previous step's selection. A step reuses the tokens of clusters that were selected at the previous step from
that buffer and copies only the others from the host (a cluster cache with history R = 1).
Clustered windows are written to the host. Counters in the cache (`HostRecall`) give the
cluster hit rate and the bytes copied (`ClusterKV.decode_stats`).
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
from kvjax.clustering import INITS, cluster_keys
from kvjax.compat import (
    conditionals_sync_host,
    from_host_bits,
    host_bits,
    host_put_rows,
    host_take_rows,
    to_host,
)
from kvjax.methods.base import (
    empty_kv,
    prefix_sum,
    read_tokens,
    to_head_major,
    write_prompt,
    write_token,
    write_tokens,
)
from kvjax.methods.sparse import SparseMethod

SELECTIONS = ("query_head", "kv_head")
NOWHERE = 2**30  # an index entry past any cache: scatters to it are dropped
RECALL_CHUNK = 1024  # rows per host -> device transfer (offload), over all (sequence, KV head) rows
RECALL_ROW_CHUNK = 8  # at least this many rows per (sequence, KV head) and transfer
SORT_KEY_LIMIT = 2**31  # `_by_label` sorts label * n + index where that stays below this (int32)


@struct.dataclass
class HostRecall:
    """`offload=True`: the clustered tokens in host memory and the device recall buffer.

    Recall heads are the query heads (`selection="query_head"`) or the KV heads
    (`"kv_head"`). The buffer holds the previous step's selection in selection order: the
    `held[c]` lowest positions of cluster `c` (0: not selected) from slot `held_at[c]` on.
    Counters are cumulative since the prefill, summed over recall heads.
    """

    # [B, Hkv, S - sink, d] pinned_host: clustered tokens in index order, as `host_bits`
    # (16-bit floats as uint16: read back with `from_host_bits`)
    host_k: jax.Array = axes(BATCH, HEADS, None, None)
    host_v: jax.Array = axes(BATCH, HEADS, None, None)
    k: jax.Array = axes(BATCH, HEADS, None, None)  # [B, Hr, budget - sink, d] device: the recall buffer
    v: jax.Array = axes(BATCH, HEADS, None, None)
    held: jax.Array = axes(BATCH, HEADS, None)  # [B, Hr, C] int32
    held_at: jax.Array = axes(BATCH, HEADS, None)  # [B, Hr, C] int32
    # Counters, replicated (no `axes`) so that every process reads them whole:
    selected: jax.Array  # [B] int32 clusters selected
    hits: jax.Array  # [B] int32 selected clusters that were selected at the previous step
    copied: jax.Array  # [B] int32 tokens copied host -> device (a K row and a V row each)
    steps: jax.Array  # [] int32 decode steps


@struct.dataclass
class ClusterLayerCache:
    # offload=False: [B, Hkv, S, d]: sinks, clustered tokens in index order, window by position.
    # offload=True: [B, Hkv, sink + W, d]: sinks, then the window (slot sink + i holds
    # position window_start + i), W = min(window, S - sink); clustered tokens are in `recall`.
    k: jax.Array = axes(BATCH, HEADS, None, None)
    v: jax.Array = axes(BATCH, HEADS, None, None)
    centroids: jax.Array = axes(BATCH, HEADS, None, None)  # [B, Hkv, C, d] float32: prompt, then window clusters
    sizes: jax.Array = axes(BATCH, HEADS, None)  # [B, Hkv, C] int32 (0: empty or unused)
    order: jax.Array = axes(BATCH, HEADS, None)  # [B, Hkv, S - sink] int32 position of the token in slot sink + i
    window_start: jax.Array = axes(BATCH)  # [B] int32 first position of the unclustered window
    windows: jax.Array = axes(BATCH)  # [B] int32 windows clustered so far
    first_window_cluster: int = struct.field(pytree_node=False)  # ids before: prompt clusters
    recall: HostRecall | None = None  # offload=True only
    # Set by `begin_decode_step` once it has clustered this step's full windows: `attend`
    # then skips its own check and clears the flag (static: no conditional is traced).
    windows_checked: bool = struct.field(pytree_node=False, default=False)


@dataclasses.dataclass(frozen=True)
class ClusterKV(SparseMethod):
    """ClusterKV with `budget` attended tokens per query head (sinks included)."""

    budget: int = 1024
    sink: int = 16
    tokens_per_cluster: int = 80
    kmeans_iters: int = 20
    window: int = 320
    window_clusters: int = 4
    selection: str = "query_head"
    init: str = "even"
    kmeans_seed: int = 0
    dense_layers: int = 2
    impl: str = "xla"
    offload: bool = False

    name = "clusterkv"

    def check_hyperparameters(self) -> None:
        super().check_hyperparameters()
        check_count("sink", self.sink, 0)
        check_count("budget", self.budget, self.sink + 1)
        check_count("tokens_per_cluster", self.tokens_per_cluster, 1)
        check_count("kmeans_iters", self.kmeans_iters, 0)
        check_count("window_clusters", self.window_clusters, 1)
        check_count("window", self.window, self.window_clusters)
        check_count("kmeans_seed", self.kmeans_seed, 0)
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if not isinstance(self.offload, bool):
            raise ValueError(f"offload must be True or False, got {self.offload!r}")

    def validate(self, spec: CacheSpec) -> None:
        if spec.capacity <= self.sink:
            raise ValueError(f"sink={self.sink} must be smaller than the cache capacity {spec.capacity}")

    # -- static sizes ------------------------------------------------------------------------

    def prompt_clusters(self, prompt_slots: int) -> int:
        return math.ceil(max(prompt_slots - self.sink, 0) / self.tokens_per_cluster)

    def max_windows(self, spec: CacheSpec) -> int:
        decode_slots = spec.capacity - (spec.prompt_capacity or 0)
        return decode_slots // self.window  # a window fills once per `window` decode steps

    # -- cache -------------------------------------------------------------------------------

    def recall_heads(self, spec: CacheSpec) -> int:
        """Heads with their own recall buffer (offload): one per distinct selection."""
        return spec.num_heads if self.selection == "query_head" else spec.num_kv_heads

    def sparse_init_cache(self, layer: int, spec: CacheSpec) -> ClusterLayerCache:
        window_slots = min(self.window, spec.capacity - self.sink)
        k, v = empty_kv(spec, self.sink + window_slots if self.offload else spec.capacity)
        prompt_clusters = self.prompt_clusters(spec.prompt_slots)
        clusters = max(1, prompt_clusters + self.window_clusters * self.max_windows(spec))
        b, h = spec.batch, spec.num_kv_heads
        return ClusterLayerCache(
            k=k,
            v=v,
            centroids=jnp.zeros((b, h, clusters, spec.head_dim), jnp.float32),
            sizes=jnp.zeros((b, h, clusters), jnp.int32),
            order=jnp.zeros((b, h, spec.capacity - self.sink), jnp.int32),
            window_start=jnp.zeros((b,), jnp.int32),
            windows=jnp.zeros((b,), jnp.int32),
            first_window_cluster=prompt_clusters,
            recall=self._init_recall(spec, clusters) if self.offload else None,
        )

    def _init_recall(self, spec: CacheSpec, clusters: int) -> HostRecall:
        host_k, host_v = empty_kv(spec, spec.capacity - self.sink)
        b, hr = spec.batch, self.recall_heads(spec)
        buffer = (b, hr, self.budget - self.sink, spec.head_dim)
        count = lambda: jnp.zeros((b,), jnp.int32)
        return HostRecall(
            host_k=to_host(host_bits(host_k)), host_v=to_host(host_bits(host_v)),
            k=jnp.zeros(buffer, spec.dtype), v=jnp.zeros(buffer, spec.dtype),
            held=jnp.zeros((b, hr, clusters), jnp.int32), held_at=jnp.zeros((b, hr, clusters), jnp.int32),
            selected=count(), hits=count(), copied=count(), steps=jnp.zeros((), jnp.int32),
        )

    def _cluster(self, keys, count, num_clusters, max_clusters, layer, salt):
        """K-means over head-major keys [B, Hkv, n, d]; count, num_clusters [B].
        Returns centroids [B, Hkv, C, d], sizes [B, Hkv, C], order [B, Hkv, n] (local)."""
        b, h, n, d = keys.shape
        rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.kmeans_seed), layer), salt)
        per_head = lambda x: jnp.repeat(x, h)
        centroids, sizes, labels = cluster_keys(
            keys.reshape(b * h, n, d), per_head(count), per_head(num_clusters), max_clusters,
            iters=self.kmeans_iters, init=self.init, key=rng, impl=self.impl,
        )
        order = _by_label(labels, max_clusters)
        unflat = lambda x: x.reshape(b, h, *x.shape[1:])
        return unflat(centroids), unflat(sizes), unflat(order)

    def sparse_ingest(self, layer, cache: ClusterLayerCache, k, v, lengths):
        t = k.shape[1]
        if self.offload:
            if t > self.sink + cache.order.shape[2]:
                raise ValueError(f"prompt of {t} tokens exceeds the cache capacity {self.sink + cache.order.shape[2]}")
            kh, vh = to_head_major(k, cache.k.dtype), to_head_major(v, cache.v.dtype)
            sinks = min(self.sink, t)
            new_k = cache.k.at[:, :, :sinks].set(kh[:, :, :sinks])
            new_v = cache.v.at[:, :, :sinks].set(vh[:, :, :sinks])
            cache = cache.replace(recall=_reset_counters(cache.recall))
        else:
            new_k, new_v = write_prompt(cache.k, k), write_prompt(cache.v, v)
            kh, vh = new_k[:, :, :t], new_v[:, :, :t]
        window_start = jnp.maximum(lengths, self.sink).astype(jnp.int32)
        cache = cache.replace(k=new_k, v=new_v, window_start=window_start)
        n = t - self.sink
        if n <= 0:
            return cache
        count = jnp.clip(lengths - self.sink, 0, n)
        max_clusters = self.prompt_clusters(t)
        if max_clusters > cache.first_window_cluster:
            raise ValueError(f"prompt of {t} tokens exceeds the cache's prompt_capacity")
        num_clusters = -(-count // self.tokens_per_cluster)
        centroids, sizes, order = self._cluster(kh[:, :, self.sink:], count, num_clusters,
                                                max_clusters, layer, salt=0)
        in_order = lambda x: jnp.take_along_axis(x[:, :, self.sink:t], order[..., None], axis=2)
        if self.offload:
            start = jnp.zeros(kh.shape[:2], jnp.int32)
            cache = cache.replace(recall=cache.recall.replace(
                host_k=_write_host(cache.recall.host_k, start, in_order(kh)),
                host_v=_write_host(cache.recall.host_v, start, in_order(vh)),
            ))
        else:
            cache = cache.replace(k=new_k.at[:, :, self.sink:t].set(in_order(new_k)),
                                  v=new_v.at[:, :, self.sink:t].set(in_order(new_v)))
        return cache.replace(
            centroids=cache.centroids.at[:, :, :max_clusters].set(centroids),
            sizes=cache.sizes.at[:, :, :max_clusters].set(sizes),
            order=cache.order.at[:, :, :n].set(order + self.sink),
        )

    # -- decode ------------------------------------------------------------------------------

    def _cluster_window(self, layer, cache: ClusterLayerCache, full):
        """Cluster the full windows (rows where `full`) and append them to the index.

        Returns the updated cache fields of the index, the window's local order [B, Hkv, w]
        and where its tokens go [B, Hkv] (`_move_window` moves them, outside the cond).
        """
        w, c_new = self.window, self.window_clusters
        start = cache.window_start
        b = start.shape[0]
        keys = read_tokens(cache.k, self._window_slot(start), w)
        count = jnp.full((b,), w, jnp.int32)
        centroids, sizes, order = self._cluster(
            keys, count, jnp.full((b,), c_new, jnp.int32), c_new, layer, salt=1 + cache.windows[0]
        )
        ids = cache.first_window_cluster + c_new * cache.windows  # [B]
        offset = cache.sizes.sum(axis=-1)  # [B, Hkv]: tokens indexed so far
        put = jax.vmap(lambda x, y, i: jax.lax.dynamic_update_slice_in_dim(x, y, i, axis=1))
        put_row = jax.vmap(jax.vmap(lambda x, y, i: jax.lax.dynamic_update_slice_in_dim(x, y, i, 0)))
        keep = lambda new, old: jnp.where(full.reshape((b,) + (1,) * (old.ndim - 1)), new, old)
        index = dict(
            centroids=keep(put(cache.centroids, centroids, ids), cache.centroids),
            sizes=keep(put(cache.sizes, sizes, ids), cache.sizes),
            order=keep(put_row(cache.order, order + start[:, None, None], offset), cache.order),
            window_start=jnp.where(full, start + w, start),
            windows=cache.windows + full,
        )
        return index, order, jnp.where(full[:, None], offset, NOWHERE)

    def _window_slot(self, window_start):
        """Cache slot [B] of the window's first token (offload keeps only the window after the sinks)."""
        return jnp.full_like(window_start, self.sink) if self.offload else window_start

    def _move_window(self, cache: ClusterLayerCache, start, order, dest) -> ClusterLayerCache:
        """Move the window that started at `start` to index entries `dest` in index order.

        The destination is the window's own slots unless NaN/Inf keys were left out of the
        index; nothing reads the window's old slots once it is clustered. With offload the
        destination is the host region. `dest == NOWHERE`: the write is dropped.
        """
        w = self.window
        in_order = lambda x: jnp.take_along_axis(read_tokens(x, self._window_slot(start), w), order[..., None], axis=2)
        if self.offload:
            return cache.replace(recall=cache.recall.replace(
                host_k=_write_host(cache.recall.host_k, dest, in_order(cache.k)),
                host_v=_write_host(cache.recall.host_v, dest, in_order(cache.v)),
            ))
        dest = jnp.minimum(dest, NOWHERE - self.sink) + self.sink
        return cache.replace(k=write_tokens(cache.k, dest, in_order(cache.k)), v=write_tokens(cache.v, dest, in_order(cache.v)))

    def begin_decode_step(self, layers: tuple, lengths) -> tuple:
        """Cluster the full windows of every ClusterKV layer before a decode step, all
        layers under one `lax.cond` (one per layer in `attend` would make a GPU wait for
        the host once per layer and step: `kvjax.compat.conditionals_sync_host`)."""
        caches = {i: c for i, c in enumerate(layers) if isinstance(c, ClusterLayerCache)}
        if not caches:
            return tuple(layers)
        done = self._cluster_full_windows(caches, lengths)
        return tuple(done[i].replace(windows_checked=True) if i in done else c for i, c in enumerate(layers))

    def cluster_full_windows(self, layer: int, cache: ClusterLayerCache, lengths) -> ClusterLayerCache:
        """Cluster the window of rows whose window holds `window` tokens (before a step)."""
        return self._cluster_full_windows({layer: cache}, lengths)[layer]

    def _has_window_room(self, cache: ClusterLayerCache) -> bool:
        """Static: whether the cache has room for window clusters at all (else the window is
        the whole decode)."""
        return cache.order.shape[2] >= self.window and cache.sizes.shape[2] > cache.first_window_cluster

    def _cluster_full_windows(self, caches: dict[int, ClusterLayerCache], lengths) -> dict[int, ClusterLayerCache]:
        """`cluster_full_windows` for several layers {layer: cache}, under one conditional."""
        active = {i: c for i, c in caches.items() if self._has_window_room(c)}
        if not active:
            return caches
        full = {}
        for i, c in active.items():
            room = c.first_window_cluster + self.window_clusters * (c.windows + 1)
            full[i] = (lengths - c.window_start >= self.window) & (room <= c.sizes.shape[2])
        # Only the small index goes through the cond: inside the decode loop XLA copies
        # buffers that pass through a conditional. The KV move is a scatter outside it that
        # drops its writes on the steps that do not cluster.

        def cluster(cs):
            return {i: self._cluster_window(i, c, full[i]) for i, c in cs.items()}

        def skip(cs):
            out = {}
            for i, c in cs.items():
                b, h = c.sizes.shape[:2]
                fields = {f: getattr(c, f) for f in ("centroids", "sizes", "order", "window_start", "windows")}
                out[i] = fields, jnp.zeros((b, h, self.window), jnp.int32), jnp.full((b, h), NOWHERE, jnp.int32)
            return out

        due = jnp.any(jnp.stack([f.any() for f in full.values()]))
        results = jax.lax.cond(due, cluster, skip, active)
        moved = {i: self._move_window(active[i].replace(**index), active[i].window_start, order, dest)
                 for i, (index, order, dest) in results.items()}
        return {**caches, **moved}

    def select(self, q, cache: ClusterLayerCache):
        """Positions [B, Hq, budget - sink] of the selected tokens and their validity."""
        index, valid = self.select_index(q, cache)
        b, hs, n = index.shape
        hq, hkv = q.shape[1], cache.order.shape[1]
        # Look the slots up in the KV head's sorted positions (no per-query-head copy).
        positions = jnp.take_along_axis(cache.order, index.reshape(b, hkv, -1), axis=-1).reshape(b, hs, n)
        return _per_query_head(positions, hq), _per_query_head(valid, hq)

    def select_index(self, q, cache: ClusterLayerCache):
        """Index entries [B, Hs, budget - sink] of the selected tokens (their cache slot minus
        `sink`) and their validity, per selection head: Hs = Hq, or Hkv with
        `selection="kv_head"` (one selection shared by a KV head's query heads).

        Ranking all C clusters is an exact sort, but XLA's CPU sort is slow; the budget is
        usually filled by the first few ranked clusters. So the top `candidates` clusters
        come from `lax.top_k` (same order as a stable descending sort, ties to the lower
        cluster id), and only when they do not fill the budget for some head does a
        `lax.cond` fall back to ranking every cluster. Both paths give the same result. On
        GPUs (`conditionals_sync_host`) every cluster is ranked, with no conditional: a
        sort of a few hundred scores per head is cheap there, a conditional per layer is not.
        """
        b, hq, _ = q.shape
        hkv = cache.k.shape[1]
        g = hq // hkv
        scores = pk.centroid_scores(q, cache.centroids, cache.sizes > 0, impl=self.impl)
        if self.selection == "kv_head":
            scores, sizes = scores.reshape(b, hkv, g, -1).mean(axis=2), cache.sizes  # [B, Hkv, C]
        else:
            sizes = jnp.repeat(cache.sizes, g, axis=1)  # [B, Hq, C]
        hs = scores.shape[1]
        starts = prefix_sum(sizes) - sizes
        n = self.budget - self.sink
        num_clusters = scores.shape[-1]
        candidates = min(num_clusters, 2 * -(-n // self.tokens_per_cluster) + 32)

        def fill(ranked):
            """Fill the budget from clusters in `ranked` order: (sorted slots, validity)."""
            ranked_sizes = jnp.take_along_axis(sizes, ranked, axis=-1)
            ranked_starts = jnp.take_along_axis(starts, ranked, axis=-1)
            ends = prefix_sum(ranked_sizes)
            slots = jnp.arange(n, dtype=jnp.int32)
            # Rank holding each slot = number of clusters ending at or before it.
            marks = jnp.zeros((b, hs, n + 1), jnp.int32).at[
                jnp.arange(b)[:, None, None], jnp.arange(hs)[None, :, None], jnp.minimum(ends, n)
            ].add(1)
            rank = jnp.minimum(prefix_sum(marks)[..., :n], ranked.shape[-1] - 1)
            before = jnp.take_along_axis(ends - ranked_sizes, rank, axis=-1)
            sorted_slot = jnp.take_along_axis(ranked_starts, rank, axis=-1) + slots - before
            return sorted_slot, slots[None, None, :] < ends[..., -1:]

        rank_all = lambda: fill(jax.lax.top_k(scores, num_clusters)[1])
        if candidates == num_clusters or conditionals_sync_host():
            sorted_slot, valid = rank_all()
        else:
            best = jax.lax.top_k(scores, candidates)[1]
            covered = jnp.take_along_axis(sizes, best, axis=-1).sum(axis=-1) >= jnp.minimum(n, sizes.sum(axis=-1))
            sorted_slot, valid = jax.lax.cond(jnp.all(covered), lambda: fill(best), rank_all)
        return jnp.clip(sorted_slot, 0, cache.order.shape[-1] - 1), valid

    def sparse_attend(self, layer, cache: ClusterLayerCache, q, k, v, lengths):
        k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)
        slots = cache.k.shape[2]
        if cache.windows_checked:  # `begin_decode_step` clustered them
            cache = cache.replace(windows_checked=False)
        else:
            cache = self.cluster_full_windows(layer, cache, lengths)
        index, selected = self.select_index(q, cache)  # per recall head
        if self.offload:
            cache = cache.replace(recall=self._recall(cache, index, selected))
            chosen = attention_part(q, cache.recall.k, cache.recall.v, selected)
            # The window sits after the sinks: slot sink + i holds position window_start + i.
            w = slots - self.sink
            first_slot, first_pos = jnp.full_like(lengths, self.sink), cache.window_start
            write_slot = jnp.where(lengths < self.sink, lengths, self.sink + lengths - cache.window_start)
        else:
            if self.selection == "kv_head" and self.impl == "xla":
                # One gather per KV head, attended by its query heads (the per-query-head
                # kernel would gather the same rows once per query head).
                gather = lambda x: jnp.take_along_axis(x, (self.sink + index)[..., None], axis=2)
                chosen = attention_part(q, gather(cache.k), gather(cache.v), selected)
            else:
                hq = q.shape[1]
                chosen = pk.sparse_decode_attention(q, cache.k, cache.v, _per_query_head(self.sink + index, hq),
                                                    _per_query_head(selected, hq), impl=self.impl)
            w = min(self.window, slots)
            first_slot = first_pos = jnp.clip(cache.window_start, 0, slots - w)
            write_slot = lengths
        parts = [chosen, current_token_part(q, k, v)]
        if self.sink:
            sink_valid = jnp.arange(self.sink)[None, :] < lengths[:, None]
            parts.append(attention_part(q, cache.k[:, :, : self.sink], cache.v[:, :, : self.sink], sink_valid))
        pos = first_pos[:, None] + jnp.arange(w)
        window_valid = (pos >= cache.window_start[:, None]) & (pos < lengths[:, None])
        parts.append(attention_part(q, read_tokens(cache.k, first_slot, w), read_tokens(cache.v, first_slot, w),
                                    window_valid))
        out = merge_parts(parts)
        return out.astype(q.dtype), cache.replace(
            k=write_token(cache.k, write_slot, k), v=write_token(cache.v, write_slot, v)
        )

    def _recall(self, cache: ClusterLayerCache, index, selected) -> HostRecall:
        """The recall buffer refilled with this step's selection (index entries [B, Hr, n]
        and validity), the counters updated.

        A selected token is resident when its cluster was selected at the previous step and
        the buffer holds it (a cluster truncated then may need its next tokens now): it is
        read from the old buffer. The others are copied from the host.
        """
        r = cache.recall
        b, hr, n = index.shape
        g = hr // cache.sizes.shape[1]
        sizes = jnp.repeat(cache.sizes, g, axis=1)  # [B, Hr, C]
        ends = prefix_sum(sizes)
        # The cluster of each entry: the first one ending after it (empty clusters never match).
        # An unrolled binary search: a while loop would stop a GPU for the host per iteration.
        cluster = jax.vmap(jax.vmap(lambda e, i: jnp.searchsorted(e, i, side="right", method="scan_unrolled")))(ends, index)
        cluster = jnp.minimum(cluster, sizes.shape[-1] - 1).astype(jnp.int32)
        at = lambda x: jnp.take_along_axis(x, cluster, axis=-1)
        offset = index - (at(ends) - at(sizes))  # position inside its cluster
        held = at(r.held)
        resident = selected & (offset < held)
        missed = selected & ~resident
        first = selected & (offset == 0)  # one slot per selected cluster

        # Resident tokens move inside the buffer: a take per recall head (batched over
        # [B, Hr]: local to each device's shard on a mesh).
        source = jnp.clip(at(r.held_at) + offset, 0, n - 1)
        moved = lambda x: jax.vmap(jax.vmap(lambda buf, i: jnp.take(buf, i, axis=0)))(x, source)
        k, v = self._fetch(r, index, missed, moved(r.k), moved(r.v))

        rows, heads = jnp.arange(b)[:, None, None], jnp.arange(hr)[None, :, None]
        slots = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), index.shape)
        count = lambda x: x.sum(axis=(1, 2), dtype=jnp.int32)
        return r.replace(
            k=k, v=v,
            held=jnp.zeros_like(r.held).at[rows, heads, cluster].add(selected.astype(jnp.int32)),
            held_at=jnp.zeros_like(r.held_at).at[rows, heads, jnp.where(first, cluster, sizes.shape[-1])].set(
                slots, mode="drop"),
            selected=r.selected + count(first),
            hits=r.hits + count(first & (held > 0)),
            copied=r.copied + count(missed),
            steps=r.steps + 1,
        )

    def _fetch(self, r: HostRecall, index, missed, k, v):
        """Copy the missed entries ([B, Hr, n] bool) from the host into the recall buffers
        k, v [B, Hr, n, d].

        Per (sequence, KV head), whose recall heads share its host rows, the missed entries
        are compacted into one list, and every such list is copied `chunk` rows at a time, as
        many times as the longest one needs (none when nothing missed): static shapes, and at
        most `chunk - 1` padding rows per list beyond the longest list's misses. The copies
        index each (sequence, KV head)'s own host rows (gathers batched over [B, Hkv]): on a
        mesh every device copies from its shard of the host store, nothing is gathered
        across devices.
        """
        b, hr, n = index.shape
        hkv = r.host_k.shape[1]
        m = hr // hkv * n  # entries per (sequence, KV head)
        chunk = min(m, max(RECALL_ROW_CHUNK, RECALL_CHUNK // (b * hkv)))
        padded = chunk * -(-m // chunk)
        per_kv_head = lambda x: x.reshape(b, hkv, m, *x.shape[3:])  # recall heads are grouped by KV head
        flat = per_kv_head(missed)
        rank = prefix_sum(flat.astype(jnp.int32)) - 1
        place = jnp.where(flat, rank, padded)  # compacted position of each missed entry in its list

        def compact(values, fill):
            put = lambda p, x: jnp.full((padded,), fill, jnp.int32).at[p].set(x, mode="drop")
            return jax.vmap(jax.vmap(put))(place, values)

        source = compact(per_kv_head(index), 0)  # host row of each list entry
        dest = compact(jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), flat.shape), m)  # buffer entry (m: none)
        misses = jnp.max(rank[..., -1]) + 1  # the longest list
        write = jax.vmap(jax.vmap(lambda buf, to, x: buf.at[to].set(x, mode="drop")))

        def copy(carry):
            i, k, v = carry
            rows = jax.lax.dynamic_slice_in_dim(source, i * chunk, chunk, axis=2)
            to = jax.lax.dynamic_slice_in_dim(dest, i * chunk, chunk, axis=2)
            k = write(k, to, from_host_bits(host_take_rows(r.host_k, rows), k.dtype))
            v = write(v, to, from_host_bits(host_take_rows(r.host_v, rows), v.dtype))
            return i + 1, k, v

        _, k, v = jax.lax.while_loop(lambda c: c[0] * chunk < misses, copy,
                                     (jnp.int32(0), per_kv_head(k), per_kv_head(v)))
        return k.reshape(b, hr, n, -1), v.reshape(b, hr, n, -1)

    def decode_stats(self, cache) -> dict:
        """Recall statistics over the sparse layers (offload only), since the prefill.

        `recall_bytes` counts the K and V rows of the tokens copied host -> device, per
        recall head: tokens * 2 * head_dim * itemsize (padding rows of a partial chunk are
        not counted). `cluster_hit_rate` = selected clusters that were already selected at
        the previous step / selected clusters (the first step after a prefill hits none).
        """
        recalls = [layer.recall for layer in cache.layers
                   if isinstance(layer, ClusterLayerCache) and layer.recall is not None]
        if not recalls:
            return {}
        total = lambda name: sum(int(np.asarray(getattr(r, name), np.int64).sum()) for r in recalls)
        selected, hits = total("selected"), total("hits")
        recall_bytes = sum(int(np.asarray(r.copied, np.int64).sum()) * 2 * r.k.shape[-1] * r.k.dtype.itemsize
                           for r in recalls)
        steps = int(recalls[0].steps)
        return {
            "cluster_hit_rate": hits / selected if selected else None,
            "clusters_selected": selected,
            "clusters_hit": hits,
            "recall_bytes": recall_bytes,
            "recall_bytes_per_step": recall_bytes / steps if steps else None,
        }


def _by_label(labels: jax.Array, num_clusters: int) -> jax.Array:
    """Indices [..., n] of `labels` (in [0, num_clusters]) sorted by (label, index).

    One sort of the unique keys `label * n + index` where they fit int32, about 5x faster
    on CPU than jnp.argsort's stable sort of (label, index) pairs (the fallback).
    """
    n = labels.shape[-1]
    if (num_clusters + 1) * n >= SORT_KEY_LIMIT:
        return jnp.argsort(labels, axis=-1, stable=True).astype(jnp.int32)
    return jax.lax.sort(labels * n + jnp.arange(n, dtype=jnp.int32), dimension=labels.ndim - 1) % n


def _per_query_head(x: jax.Array, num_heads: int) -> jax.Array:
    """Per-selection-head values [B, Hs, ...] repeated to `num_heads` query heads (a kv_head
    selection is shared by its group; per-query-head values come back unchanged)."""
    return jnp.repeat(x, num_heads // x.shape[1], axis=1)


def _write_host(host: jax.Array, start: jax.Array, values: jax.Array) -> jax.Array:
    """`write_tokens` for a host buffer [B, H, S, d] (`host_bits`): start [B, H], values
    [B, H, n, d] in the cache dtype (slots past S are dropped)."""
    s = host.shape[2]
    slots = start[..., None] + jnp.arange(values.shape[2])
    return host_put_rows(host, jnp.where(slots < s, slots, s), host_bits(values))


def _reset_counters(recall: HostRecall) -> HostRecall:
    """A new prompt: nothing held in the recall buffer, counters from zero."""
    zero = jnp.zeros_like
    return recall.replace(held=zero(recall.held), selected=zero(recall.selected), hits=zero(recall.hits),
                          copied=zero(recall.copied), steps=zero(recall.steps))
