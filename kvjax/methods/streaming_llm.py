"""`StreamingLLM`: attention sinks plus a window of the most recent tokens.

The device holds exactly `budget` token slots per layer: `sink` fixed slots for the first
tokens and a ring of `budget - sink` slots for the most recent ones (the current token
included). Evicted tokens are gone. Keys keep their original positions (post-RoPE), as in
the Quest/ClusterKV evaluations of this baseline. The prompt is prefilled with dense
attention and then trimmed to the budget.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.attention import decode_attention
from kvjax.cache import BATCH, HEADS, CacheSpec, axes
from kvjax.checks import check_count
from kvjax.methods.base import Method, check_layer_inputs, empty_kv, to_head_major, write_token


@struct.dataclass
class RingLayerCache:
    k: jax.Array = axes(BATCH, HEADS, None, None)  # [B, Hkv, budget, d]
    v: jax.Array = axes(BATCH, HEADS, None, None)
    pos: jax.Array = axes(BATCH, None)  # [B, budget] int32 position held by each slot, -1 when empty


@dataclasses.dataclass(frozen=True)
class StreamingLLM(Method):
    budget: int = 1024
    sink: int = 4

    name = "streaming_llm"

    def check_hyperparameters(self) -> None:
        check_count("sink", self.sink, 0)
        check_count("budget", self.budget, self.sink + 1)

    @property
    def window(self) -> int:
        return self.budget - self.sink

    def slot_of(self, position: jax.Array) -> jax.Array:
        """Slot holding `position` while it is cached."""
        ring = self.sink + (position - self.sink) % self.window
        return jnp.where(position < self.sink, position, ring)

    def init_cache(self, layer: int, spec: CacheSpec) -> RingLayerCache:
        k, v = empty_kv(spec, self.budget)
        return RingLayerCache(k, v, jnp.full((spec.batch, self.budget), -1, jnp.int32))

    def ingest(self, layer, cache: RingLayerCache, k, v, lengths):
        check_layer_inputs(self, cache, k, v, lengths)
        # For every slot, the latest prompt position that maps to it (or -1).
        slots = jnp.arange(self.budget)
        ring_index = slots - self.sink
        last = lengths[:, None] - 1
        latest = self.sink + ring_index + self.window * ((last - self.sink - ring_index) // self.window)
        pos = jnp.where(slots < self.sink, slots, latest)
        pos = jnp.where((pos >= 0) & (pos <= last) & ((slots < self.sink) | (latest >= self.sink)), pos, -1)
        gather = jnp.clip(pos, 0, k.shape[1] - 1)[:, None, :, None]
        new_k = jnp.take_along_axis(to_head_major(k, cache.k.dtype), gather, axis=2)
        new_v = jnp.take_along_axis(to_head_major(v, cache.v.dtype), gather, axis=2)
        return RingLayerCache(new_k, new_v, pos.astype(jnp.int32))

    def attend(self, layer, cache: RingLayerCache, q, k, v, lengths):
        check_layer_inputs(self, cache, k, v, lengths, q, decode=True)
        k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)
        slot = self.slot_of(lengths)
        # The token in the current token's slot is the one being evicted: not attended.
        evicted = jnp.arange(self.budget)[None, :] == slot[:, None]
        out = decode_attention(q, cache.k, cache.v, (cache.pos >= 0) & ~evicted, current=(k, v))
        pos = jax.vmap(lambda p, s, x: p.at[s].set(x))(cache.pos, slot, lengths)
        return out, RingLayerCache(write_token(cache.k, slot, k), write_token(cache.v, slot, v), pos)
