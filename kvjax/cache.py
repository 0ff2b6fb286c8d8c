"""The model-level KV cache pytree and its static description.

A `Cache` holds one layer cache per decoder layer (whatever pytree the method defines) and
the number of tokens already cached per sequence. It is immutable: every step returns a new
one, and jitted steps donate the old one so XLA updates the buffers in place.

Cache dataclasses name the dimensions of their arrays with `axes(...)` fields: `BATCH` for
the sequence dimension, `HEADS` for a (query or KV) head dimension. `kvjax.sharding` splits
those dimensions over a device mesh; dimensions left unnamed, and fields declared without
`axes`, are replicated.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.checks import check_count, is_integer


BATCH = "batch"  # one entry per sequence of the batch
HEADS = "heads"  # one entry per attention head (query heads or KV heads)


def axes(*names: str | None, **field_kwargs: Any) -> Any:
    """A dataclass field holding an array whose dimensions are `names` (`BATCH`, `HEADS` or
    None, one per dimension), for `kvjax.sharding`; `field_kwargs` go to `struct.field`."""
    return struct.field(metadata={"axes": names}, **field_kwargs)


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """Static sizes a method needs to allocate its layer caches."""

    batch: int
    capacity: int  # most tokens one sequence will hold: prompt bucket + decode steps
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: Any = jnp.float32
    prompt_capacity: int | None = None  # padded prompt length (None: the whole capacity)

    def __post_init__(self) -> None:
        """Refuse sizes no cache can have, naming the field (a wrong spec would otherwise
        surface as an XLA shape error inside a method's jitted step)."""
        for name in ("batch", "capacity", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            check_count(f"CacheSpec.{name}", getattr(self, name))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"CacheSpec.num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        p = self.prompt_capacity
        if p is not None and (not is_integer(p) or not 1 <= p <= self.capacity):
            raise ValueError(f"CacheSpec.prompt_capacity must be None or an integer in [1, capacity={self.capacity}], got {p!r}")
        if not jnp.issubdtype(self.dtype, jnp.floating):
            raise TypeError(f"CacheSpec.dtype must be a floating-point dtype, got {self.dtype!r}")

    @property
    def prompt_slots(self) -> int:
        """Slots the prompt may fill; the rest of `capacity` is for decode steps."""
        return self.capacity if self.prompt_capacity is None else self.prompt_capacity


@struct.dataclass
class Cache:
    layers: tuple[Any, ...]
    lengths: jax.Array = axes(BATCH)  # [B] int32: tokens cached per sequence (= position of the next token)


def init_cache(method, spec: CacheSpec) -> Cache:
    """Allocate an empty cache for `method` (validates the method against `spec` first)."""
    from kvjax.methods.base import check_method  # here: kvjax.methods imports this module

    check_method(method)
    if not isinstance(spec, CacheSpec):
        raise TypeError(f"spec must be a CacheSpec(batch=..., capacity=..., num_layers=..., ...), got {spec!r:.80}")
    method.validate(spec)
    layers = tuple(method.init_cache(i, spec) for i in range(spec.num_layers))
    return Cache(layers=layers, lengths=jnp.zeros((spec.batch,), jnp.int32))


def kv_bytes(cache: Cache) -> tuple[int, int]:
    """Bytes of cache arrays on the device and in host memory, by each array's memory kind."""
    device = host = 0
    for leaf in jax.tree_util.tree_leaves(cache.layers):
        kind = getattr(getattr(leaf, "sharding", None), "memory_kind", None)
        if kind is not None and "host" in kind:
            host += leaf.nbytes
        else:
            device += leaf.nbytes
    return device, host
