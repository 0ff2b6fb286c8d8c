"""`ReKV`: streaming baseline with the long-term frames offloaded to host memory.

ALGORITHMS.md section 5 item 6. Clips are encoded against `[init | short-term]` only (a
sliding window: the long-term memory is on the host). Frames leaving the FIFO are written
uncompressed to `pinned_host` buffers, and their mean pre-RoPE key per KV head stays on the
device. At question time each layer scores every long-term frame by the mean over KV heads
of `mean question query . mean frame key`, copies the top `retrieve_frames` frames (in
temporal order) from the host and attends to `[init | retrieved | short-term | question]`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from kvjax.checks import check_count
from kvjax.compat import from_host_bits, host_bits, host_take_heads, to_host
from kvjax.methods.stream_memory import (
    Moved, Segment, StreamLayer, StreamLayout, StreamMethod, StreamState, counts_before, mean_query,
)


@dataclasses.dataclass(frozen=True)
class ReKV(StreamMethod):
    retrieve_frames: int = 64

    name = "rekv"
    offloaded = True

    def check_hyperparameters(self) -> None:
        super().check_hyperparameters()
        check_count("retrieve_frames", self.retrieve_frames, 1)

    def frame_capacity(self, needed: int) -> int:
        return max(64, 1 << math.ceil(math.log2(max(needed, 1))))

    def encode_bound(self, layout: StreamLayout) -> int:
        return layout.init_tokens + self.short_capacity(layout) + self.move_capacity(layout)

    def answer_bound(self, layout: StreamLayout, question_tokens: int) -> int:
        retrieved = self.retrieve_frames * layout.frame_tokens
        return layout.init_tokens + retrieved + self.short_capacity(layout) + question_tokens

    def _place(self, x: jax.Array) -> jax.Array:
        # 16-bit floats as their uint16 bits (`host_bits`): XLA's CPU backend would otherwise
        # convert the whole host store to float32 around every retrieval.
        return to_host(host_bits(jnp.asarray(x)))

    def encode_memory(self, layout: StreamLayout, layer: StreamLayer, state: StreamState) -> Segment | None:
        return None

    def _moved_frames(self, valid: jax.Array, frame: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Clip-local frame index of each moved token (clip_frames when not valid) and the
        number of tokens of each moved frame [clip_frames]."""
        local = jnp.where(valid, frame - frame[0], self.clip_frames)
        counts = jnp.zeros(self.clip_frames + 1, jnp.int32).at[local].add(1)[: self.clip_frames]
        return local, counts

    def store(self, layout: StreamLayout, layer: StreamLayer, state: StreamState, moved: Moved,
              long_scores: jax.Array | None) -> StreamLayer:
        # One block copy per buffer; slots past the valid tokens are rewritten by the next clip.
        start = (0, state.long_len, 0)
        long_k = jax.lax.dynamic_update_slice(layer.long_k, self._place(moved.k.astype(layer.short_k.dtype)), start)
        long_v = jax.lax.dynamic_update_slice(layer.long_v, self._place(moved.v.astype(layer.short_v.dtype)), start)
        local, counts = self._moved_frames(moved.valid, moved.frame)
        hkv, _, d = moved.k.shape
        sums = jnp.zeros((hkv, self.clip_frames + 1, d), jnp.float32).at[:, local].add(moved.k.astype(jnp.float32))
        means = sums[:, : self.clip_frames] / jnp.maximum(counts, 1)[None, :, None]
        slot = self._frame_slots(state, counts, layer.frame_keys.shape[1])
        frame_keys = layer.frame_keys.at[:, slot].set(means.astype(layer.frame_keys.dtype), mode="drop")
        return layer.replace(long_k=long_k, long_v=long_v, frame_keys=frame_keys)

    def _frame_slots(self, state: StreamState, counts: jax.Array, capacity: int) -> jax.Array:
        """Frame-table slots of the moved frames (capacity, i.e. dropped, for absent ones)."""
        return jnp.where(counts > 0, state.long_frames + jnp.arange(self.clip_frames), capacity)

    def update_index(self, layout: StreamLayout, state: StreamState, valid: jax.Array, frame: jax.Array) -> StreamState:
        _, counts = self._moved_frames(valid, frame)
        slot = self._frame_slots(state, counts, state.frame_len.shape[0])
        starts = state.long_len + counts_before(counts)
        return state.replace(
            long_len=state.long_len + valid.sum(),
            long_frames=state.long_frames + (counts > 0).sum(),
            frame_start=state.frame_start.at[slot].set(starts, mode="drop"),
            frame_len=state.frame_len.at[slot].set(counts, mode="drop"),
        )

    def retrieve(self, layout: StreamLayout, layer: StreamLayer, state: StreamState, q: jax.Array,
                 q_valid: jax.Array) -> Segment:
        hkv, cap, d = layer.long_k.shape
        frames = layer.frame_keys.shape[1]
        top = min(self.retrieve_frames, frames)
        scores = jnp.einsum("hd,hfd->f", mean_query(q, q_valid, hkv), layer.frame_keys.astype(jnp.float32))
        _, chosen = jax.lax.top_k(jnp.where(jnp.arange(frames) < state.long_frames, scores, -jnp.inf), top)
        count = jnp.minimum(state.long_frames, top)
        chosen = jnp.sort(jnp.where(jnp.arange(top) < count, chosen, frames))  # temporal order, absent last
        lengths = jnp.where(chosen < frames, state.frame_len[jnp.minimum(chosen, frames - 1)], 0)
        # The chosen frames' tokens back to back (a valid prefix): output token j belongs to the
        # last chosen frame starting at or before it.
        starts = counts_before(lengths)
        j = jnp.arange(top * layout.frame_tokens)
        which = (starts[None, :] <= j[:, None]).sum(axis=1) - 1
        slots = state.frame_start[jnp.minimum(chosen[which], frames - 1)] + j - starts[which]
        # Per KV head (a gather batched over heads): on a mesh each device reads its own heads.
        rows = jnp.broadcast_to(jnp.clip(slots, 0, cap - 1), (hkv, j.shape[0]))
        k = from_host_bits(host_take_heads(layer.long_k, rows), layer.short_k.dtype)
        v = from_host_bits(host_take_heads(layer.long_v, rows), layer.short_v.dtype)
        return k, v, j < lengths.sum()
