"""`LiveVLM`: bounded streaming memory with Vision Sink Bucketing and Position-agnostic Retrieval.

ALGORITHMS.md section 5. Frames leaving the short-term FIFO join the long-term memory; when it
holds more than `M` tokens, Vision Sink Bucketing (VSB) keeps exactly `M` of them per layer:

- scores `S_j`: mean over the last `score_queries` queries of the clip just encoded and over
  all heads of their softmax attention probability on token `j` (for a VLM these are the last
  frame's vision queries; for text frames they are the last `score_queries` queries of the
  stream, i.e. of the current clip, all of them when the clip is shorter);
- `N = M / bucket_size` buckets, token `p` of `n` goes to bucket `floor(p * N / n)`;
- phase 1 keeps the top `R = sink_fraction * M` tokens whatever their bucket;
- phase 2 walks the others by descending score and keeps one when its bucket has room, until
  `M` are kept (ties: the lower index first). Kept tokens stay in temporal order.

Deviation (opt-in, `vsb_score="keydiff"`): VSB ranks tokens by how distinct their keys are
instead of by attention: `S_j` is minus the cosine similarity of token `j`'s pre-RoPE key to
the mean of the long-term memory's unit keys, per KV head, averaged over the KV heads
(KeyDiff, Park et al., 2025), recomputed at each compression from the stored keys. The
attention score suits video, where a scene stays in view and later frames keep attending its
tokens. In a caption stream later lines attend the earlier lines that resemble them (the
repeated caption words), not a one-off fact, so attention ranks the fact's tokens with the
filler and VSB thins them out; running scores over every clip that saw a token (max, sum)
did not change that. A one-off fact is what distinct keys single out (measured on
SmolLM2 caption streams: docs/methods/livevlm.md).

At question time Position-agnostic Retrieval (PaR) splits the long-term pre-RoPE keys into
pages of `page_size`, scores each page's mean key against the question's mean pre-RoPE query,
and keeps the top `retrieve_ratio` of the pages (ceil, in temporal order).

`memory_tokens=None` means 12288 capped so that no attended position reaches the model's
trained context (init + M + short-term + one clip); an explicit value that does not fit is an
error.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from kvjax.checks import check_count
from kvjax.methods.stream_memory import (
    Moved, Segment, StreamLayer, StreamLayout, StreamMethod, StreamState, append_slots, mean_query,
)

DEFAULT_MEMORY = 12288
VSB_SCORES = ("attention", "keydiff")


def vsb_keep(scores: jax.Array, n: jax.Array, m: int, sink: int, bucket_size: int) -> jax.Array:
    """Vision Sink Bucketing: which of the first `n` tokens to keep (exactly `m` when n > m).

    scores: [C] float32; n: int32 [] valid tokens; m: tokens to keep, a multiple of
    `bucket_size`; sink: phase-1 tokens (`sink_fraction * m`). Returns keep [C] bool (all
    valid tokens when n <= m).
    """
    c = scores.shape[0]
    idx = jnp.arange(c)
    valid = idx < n
    order = jnp.argsort(jnp.where(valid, -scores, jnp.inf), stable=True)  # descending score
    rank = jnp.zeros(c, jnp.int32).at[order].set(idx.astype(jnp.int32))
    phase1 = valid & (rank < sink)

    buckets = m // bucket_size
    bucket = jnp.where(valid, (idx * buckets) // jnp.maximum(n, 1), buckets)  # invalid: no bucket
    occupied = jnp.zeros(buckets + 1, jnp.int32).at[bucket].add(phase1.astype(jnp.int32))
    room = jnp.maximum(bucket_size - occupied, 0)

    # Rank of each candidate among its bucket's candidates by descending score: its position
    # in the (bucket, score) order minus the first such position of its bucket.
    candidate = valid & ~phase1
    key = jnp.where(candidate, bucket * c + rank, (buckets + 1) * c)
    sorted_pos = jnp.zeros(c, jnp.int32).at[jnp.argsort(key)].set(idx.astype(jnp.int32))
    first = jnp.full(buckets + 1, c, jnp.int32).at[bucket].min(jnp.where(candidate, sorted_pos, c))
    eligible = candidate & (sorted_pos - first[bucket] < room[bucket])

    # The walk stops once m tokens are kept: the first m - sink eligible ones by score.
    phase2 = jnp.zeros(c, bool)
    if m > sink:
        last = jnp.sort(jnp.where(eligible, rank, c))[m - sink - 1]  # c when fewer are eligible
        phase2 = eligible & (rank <= last)
    return jnp.where(n > m, phase1 | phase2, valid)


def key_distinctness(keys: jax.Array, n: jax.Array) -> jax.Array:
    """KeyDiff score of the first `n` tokens (higher: more distinct; the rest are unspecified).

    keys: [Hkv, C, d] pre-RoPE. Minus the cosine similarity of each key to the mean unit key
    of the `n` tokens in its head, averaged over KV heads. Returns [C] float32.
    """
    unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    k = unit(keys.astype(jnp.float32))
    valid = jnp.arange(keys.shape[1]) < n
    anchor = unit(jnp.where(valid[None, :, None], k, 0.0).sum(axis=1))
    return -jnp.einsum("hcd,hd->c", k, anchor) / keys.shape[0]


def retrieved_pages(n_pages: jax.Array, ratio: float) -> jax.Array:
    """Pages PaR keeps out of `n_pages`: ceil(ratio * n_pages) (float32, 1e-6 slack)."""
    return jnp.ceil(ratio * n_pages.astype(jnp.float32) - 1e-6).astype(jnp.int32)


def par_pages(keys: jax.Array, n: jax.Array, query: jax.Array, page_size: int, ratio: float) -> jax.Array:
    """Position-agnostic Retrieval: which pages of the first `n` long-term tokens a question attends.

    keys: [Hkv, C, d] pre-RoPE (C a multiple of page_size); query: [Hkv, d] mean pre-RoPE
    question query per KV head. A page's score is the mean over KV heads of
    `query . mean_key / sqrt(d)`; the top `ceil(ratio * pages)` pages are kept (ties: the
    earlier page). Returns keep [C / page_size] bool.
    """
    hkv, c, d = keys.shape
    pages = c // page_size
    counts = jnp.clip(n - jnp.arange(pages) * page_size, 0, page_size)
    tokens_valid = (jnp.arange(c) < n).astype(jnp.float32)
    sums = (keys.astype(jnp.float32) * tokens_valid[None, :, None]).reshape(hkv, pages, page_size, d).sum(axis=2)
    page_keys = sums / jnp.maximum(counts, 1)[None, :, None]
    scores = jnp.einsum("hd,hpd->p", query, page_keys) / (hkv * jnp.sqrt(jnp.float32(d)))
    page_valid = counts > 0
    order = jnp.argsort(jnp.where(page_valid, -scores, jnp.inf), stable=True)
    rank = jnp.zeros(pages, jnp.int32).at[order].set(jnp.arange(pages, dtype=jnp.int32))
    return page_valid & (rank < retrieved_pages(page_valid.sum(), ratio))


@dataclasses.dataclass(frozen=True)
class LiveVLM(StreamMethod):
    memory_tokens: int | None = None  # M per layer; None: DEFAULT_MEMORY capped to the context
    sink_fraction: float = 0.25
    bucket_size: int = 1
    score_queries: int = 196  # r: the last queries whose attention scores rank tokens
    page_size: int = 16
    retrieve_ratio: float = 0.4
    vsb_score: str = "attention"  # what VSB ranks tokens by: "attention" (the spec) or "keydiff"

    name = "livevlm"

    @property
    def needs_scores(self) -> bool:
        return self.vsb_score == "attention"

    def memory(self, layout: StreamLayout) -> int:
        """M: the long-term tokens kept per layer (the default capped to the context)."""
        room = layout.max_position - layout.init_tokens - self.short_capacity(layout) - self.move_capacity(layout)
        if self.memory_tokens is not None:
            if self.memory_tokens > room:
                raise ValueError(
                    f"memory_tokens={self.memory_tokens} does not fit the model's trained context of "
                    f"{layout.max_position} positions with init ({layout.init_tokens}), short-term "
                    f"({self.short_capacity(layout)}) and clip ({self.move_capacity(layout)}) slots: "
                    f"use memory_tokens <= {room}"
                )
            return self.memory_tokens
        unit = math.lcm(self.page_size, self.bucket_size)
        m = unit * (min(DEFAULT_MEMORY, room) // unit)
        if m < unit:
            raise ValueError(
                f"no room for long-term memory in the trained context of {layout.max_position} "
                f"positions: reduce short_frames ({self.short_frames}), clip_frames ({self.clip_frames}) "
                f"or the frame_tokens ({layout.frame_tokens})"
            )
        return m

    def check_hyperparameters(self) -> None:
        super().check_hyperparameters()
        if self.memory_tokens is not None:
            check_count("memory_tokens", self.memory_tokens, 1)
        check_count("bucket_size", self.bucket_size, 1)
        check_count("score_queries", self.score_queries, 1)
        if self.vsb_score not in VSB_SCORES:
            raise ValueError(f"vsb_score must be one of {VSB_SCORES}, got {self.vsb_score!r}")
        check_count("page_size", self.page_size, 1)
        if not isinstance(self.sink_fraction, (int, float)) or not 0.0 <= self.sink_fraction <= 1.0:
            raise ValueError(f"sink_fraction must be in [0, 1], got {self.sink_fraction!r}")
        if not isinstance(self.retrieve_ratio, (int, float)) or not 0.0 < self.retrieve_ratio <= 1.0:
            raise ValueError(f"retrieve_ratio must be in (0, 1], got {self.retrieve_ratio!r}")

    def validate(self, layout: StreamLayout) -> None:
        m = self.memory(layout)
        if m % self.bucket_size or m < 1:
            raise ValueError(f"memory_tokens={m} must be a multiple of bucket_size={self.bucket_size}")

    def long_capacity(self, layout: StreamLayout, needed: int) -> int:
        total = self.memory(layout) + self.move_capacity(layout)
        return self.page_size * math.ceil(total / self.page_size)

    def retrieved_capacity(self, long_capacity: int) -> int:
        """Most tokens PaR retrieves from a long-term buffer of `long_capacity` slots."""
        pages = long_capacity // self.page_size
        return self.page_size * math.ceil(self.retrieve_ratio * pages - 1e-6)

    def encode_bound(self, layout: StreamLayout) -> int:
        return layout.init_tokens + self.memory(layout) + self.short_capacity(layout) + self.move_capacity(layout)

    def answer_bound(self, layout: StreamLayout, question_tokens: int) -> int:
        retrieved = self.retrieved_capacity(self.long_capacity(layout, 0))
        return layout.init_tokens + retrieved + self.short_capacity(layout) + question_tokens

    def store(self, layout: StreamLayout, layer: StreamLayer, state: StreamState, moved: Moved,
              long_scores: jax.Array | None) -> StreamLayer:
        appended = super().store(layout, layer, state, moved, None)
        n = state.long_len + moved.valid.sum()
        if self.vsb_score == "keydiff":
            scores = key_distinctness(appended.long_k, n)
        else:
            slot = append_slots(moved.valid, state.long_len, layer.long_k.shape[1])
            scores = long_scores.at[slot].set(moved.scores, mode="drop")
        m = self.memory(layout)
        keep = vsb_keep(scores, n, m, int(self.sink_fraction * m), self.bucket_size)
        return appended.replace(long_k=compact(appended.long_k, keep), long_v=compact(appended.long_v, keep))

    def update_index(self, layout: StreamLayout, state: StreamState, valid: jax.Array, frame: jax.Array) -> StreamState:
        return state.replace(long_len=jnp.minimum(state.long_len + valid.sum(), self.memory(layout)))

    def retrieve(self, layout: StreamLayout, layer: StreamLayer, state: StreamState, q: jax.Array,
                 q_valid: jax.Array) -> Segment:
        hkv, c, _ = layer.long_k.shape
        keep = par_pages(layer.long_k, state.long_len, mean_query(q, q_valid, hkv), self.page_size, self.retrieve_ratio)
        # The kept pages in temporal order, gathered to the front: the answer pays only for
        # them. Only the last page can be partial, so the valid tokens stay a prefix.
        pages = self.retrieved_capacity(c) // self.page_size
        chosen = jnp.sort(jnp.where(keep, jnp.arange(keep.shape[0]), keep.shape[0]))[:pages]
        source = (chosen[:, None] * self.page_size + jnp.arange(self.page_size)).reshape(-1)
        valid = source < state.long_len  # chosen pages past the last are out of range too
        source = jnp.minimum(source, c - 1)
        return layer.long_k[:, source], layer.long_v[:, source], valid


def compact(x: jax.Array, keep: jax.Array) -> jax.Array:
    """x [H, C, d] with the kept slots moved to the front in order (the rest zeroed)."""
    order = jnp.argsort(~keep, stable=True)
    return jnp.where((jnp.arange(keep.shape[0]) < keep.sum())[None, :, None], x[:, order], 0)
