"""`Full`: dense attention over a contiguous cache (the accuracy ceiling)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.attention import decode_attention
from kvjax.cache import BATCH, HEADS, CacheSpec, axes
from kvjax.methods.base import Method, check_layer_inputs, empty_kv, write_prompt, write_token


@struct.dataclass
class DenseLayerCache:
    k: jax.Array = axes(BATCH, HEADS, None, None)  # [B, Hkv, capacity, d], slot == position
    v: jax.Array = axes(BATCH, HEADS, None, None)


@dataclasses.dataclass(frozen=True)
class Full(Method):
    """Keep every token on the device and attend to all of them."""

    name = "full"

    def init_cache(self, layer: int, spec: CacheSpec) -> DenseLayerCache:
        return DenseLayerCache(*empty_kv(spec, spec.capacity))

    def ingest(self, layer, cache: DenseLayerCache, k, v, lengths):
        check_layer_inputs(self, cache, k, v, lengths)
        return DenseLayerCache(write_prompt(cache.k, k), write_prompt(cache.v, v))

    def attend(self, layer, cache: DenseLayerCache, q, k, v, lengths):
        check_layer_inputs(self, cache, k, v, lengths, q, decode=True)
        k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)
        valid = jnp.arange(cache.k.shape[2])[None, :] < lengths[:, None]
        out = decode_attention(q, cache.k, cache.v, valid, current=(k, v))
        return out, DenseLayerCache(write_token(cache.k, lengths, k), write_token(cache.v, lengths, v))
