"""The method interface: how a KV-cache method plugs into any decoder.

A method is a frozen dataclass of hyperparameters with three pure functions, all called per
layer (the layer index is static, so a method may treat early layers differently):

- `init_cache(layer, spec) -> layer_cache`: allocate the layer's (empty) cache pytree.
- `prefill(layer, cache, q, k, v, lengths) -> (out, cache)`: the prompt's attention output
  (exact causal attention) and the cache with the prompt's K/V written and indexed.
  q: [B, T, Hq, d] post-RoPE, k/v: [B, T, Hkv, d], lengths: [B] valid (right-padded) tokens.
  By default this is `causal_attention` plus `ingest(layer, cache, k, v, lengths)`, the part
  that builds the cache; `ingest` alone turns a dense prompt cache into this method's cache
  (one shared prefill, several methods: `kvjax.generation.convert`).
- `attend(layer, cache, q, k, v, lengths) -> (out, cache)`: one decode step. q: [B, Hq, d],
  k/v: [B, Hkv, d] for the current token at position `lengths[b]`. The current token is
  written and attended exactly once.

One more, optional: `begin_decode_step(layers, lengths) -> layers`, called by the model
before a decode step with every layer's cache, for work shared by the layers (ClusterKV
clusters its windows there under one conditional instead of one per layer). `attend` stays
correct without it.

Methods never import the model; the model never looks inside a layer cache.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from kvjax.attention import causal_attention
from kvjax.cache import CacheSpec
from kvjax.checks import plain_numbers
from kvjax.compat import prefix_sums_as_scan
from pallas_kernels import check_operands


@dataclasses.dataclass(frozen=True)
class Method:
    """Base class; subclasses are frozen dataclasses (hashable, usable as jit static args)."""

    name: ClassVar[str] = "method"

    def __post_init__(self) -> None:
        plain_numbers(self)
        self.check_hyperparameters()

    def check_hyperparameters(self) -> None:
        """Raise ValueError naming the parameter when a hyperparameter is invalid on its own.
        Runs on construction, so `ClusterKV(budget=-1)` fails where it is written."""

    def validate(self, spec: CacheSpec) -> None:
        """Raise ValueError naming the parameter when the hyperparameters cannot work with a
        cache of this shape (the checks that need its sizes)."""

    def init_cache(self, layer: int, spec: CacheSpec) -> Any:
        raise NotImplementedError

    def prefill(self, layer: int, cache: Any, q, k, v, lengths) -> tuple[jax.Array, Any]:
        check_layer_inputs(self, cache, k, v, lengths, q=q)
        return causal_attention(q, k, v, lengths), self.ingest(layer, cache, k, v, lengths)

    def ingest(self, layer: int, cache: Any, k, v, lengths) -> Any:
        raise NotImplementedError

    def attend(self, layer: int, cache: Any, q, k, v, lengths) -> tuple[jax.Array, Any]:
        raise NotImplementedError

    def begin_decode_step(self, layers: tuple, lengths: jax.Array) -> tuple:
        """Every layer's cache before a decode step at positions `lengths` [B], updated by
        work the layers share. Default: unchanged."""
        return tuple(layers)

    def decode_stats(self, cache: Any) -> dict[str, Any]:
        """Method-specific statistics read from a decoded model-level `Cache` (e.g. FreeKV's
        correction rate), merged into the generation stats. Default: none."""
        return {}

    def describe(self) -> dict[str, Any]:
        """Name and hyperparameters, for result tables and JSON."""
        return {"method": self.name, **dataclasses.asdict(self)}


def write_tokens(buffer: jax.Array, start: jax.Array, values: jax.Array) -> jax.Array:
    """Write n consecutive tokens per row and head.

    buffer [B, H, S, d]; start [B] or [B, H] first slot; values [B, H, n, d]. A scatter, not
    a vmapped dynamic_update_slice: XLA lowers the latter with per-row starts to a select
    over the whole buffer (a full-cache pass per decode step); the scatter updates B*H*n
    rows in place. Out-of-range slots are dropped (generate checks capacity before
    decoding, so this never hides a write).
    """
    b, h, n, _ = values.shape
    start = jnp.broadcast_to(start.reshape(b, -1), (b, h))
    slots = start[..., None] + jnp.arange(n)  # [B, H, n]
    rows, heads = jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None]
    return buffer.at[rows, heads, slots].set(values.astype(buffer.dtype), mode="drop")


def write_token(buffer: jax.Array, slot: jax.Array, value: jax.Array) -> jax.Array:
    """Write one token per sequence: buffer [B, H, S, d], slot [B], value [B, H, d]."""
    return write_tokens(buffer, slot, value[:, :, None])


def prefix_sum(x: jax.Array) -> jax.Array:
    """Inclusive cumulative sum over the last axis.

    Selection computes several prefix sums over tens to thousands of entries per layer and
    step. On CPU an associative scan runs them 1.6-2.7x faster than `jnp.cumsum` (a
    reduce-window that XLA rewrites into a blocked scan), at the price of more operations to
    compile. Elsewhere `jnp.cumsum`: 5-9 compiled operations where the scan takes 10-46,
    and on a GPU each is a kernel launch, three prefix sums per ClusterKV layer and step
    (`bench/prefix_sum.py`, bench/results/prefix_sum-cpu-2026-12-07.json).
    """
    if prefix_sums_as_scan():
        return jax.lax.associative_scan(jnp.add, x, axis=-1)
    return jnp.cumsum(x, axis=-1)


def read_tokens(buffer: jax.Array, start: jax.Array, size: int) -> jax.Array:
    """Read `size` consecutive slots per sequence: buffer [B, H, S, d], start [B] -> [B, H, size, d]."""
    return jax.vmap(lambda buf, s: jax.lax.dynamic_slice_in_dim(buf, s, size, axis=1))(buffer, start)


def to_head_major(x: jax.Array, dtype) -> jax.Array:
    """[B, T, H, d] -> [B, H, T, d] in the cache dtype."""
    return x.transpose(0, 2, 1, 3).astype(dtype)


def write_prompt(buffer: jax.Array, x: jax.Array) -> jax.Array:
    """Write a prompt's [B, T, H, d] values into slots [0, T) of a [B, H, S, d] buffer."""
    t = x.shape[1]
    if t > buffer.shape[2]:
        raise ValueError(f"prompt of {t} tokens exceeds the cache capacity {buffer.shape[2]}")
    return buffer.at[:, :, :t].set(to_head_major(x, buffer.dtype))


def check_layer_inputs(method: Method, cache: Any, k, v, lengths, q=None, *, decode: bool = False) -> None:
    """Refuse a layer's inputs that do not fit its cache or each other, naming the argument.

    Prompt: q [B, T, Hq, d], k/v [B, T, Hkv, d]; decode step (`decode=True`): q [B, Hq, d],
    k/v [B, Hkv, d]; lengths [B] integers; the cache's `k` buffer [B, Hkv, slots, d] fixes
    B, Hkv and d. `models.llama` builds consistent inputs itself; this is for a model brought
    to kvjax that calls `prefill` / `attend` directly, where a wrong head count or batch
    would otherwise be dropped or broadcast silently by the cache writes. Shapes are static:
    no run-time cost.
    """
    b, hkv, _, d = cache.k.shape
    known = {"B": ("the cache has B", b), "Hkv": ("the cache has Hkv", hkv), "d": ("the cache has d", d)}
    layout = "B {} d" if decode else "B T {} d"
    operands = {"k": (k, layout.format("Hkv"), "float"), "v": (v, layout.format("Hkv"), "float"),
                "lengths": (lengths, "B", "int")}
    if q is not None:
        operands["q"] = (q, layout.format("Hq"), "float")
    check_operands(f"{method.name} layer inputs", known, **operands)


def check_method(method: Any) -> None:
    """Raise unless `method` is a kvjax Method (the entry points take instances, not names)."""
    if not isinstance(method, Method):
        raise TypeError(f"method must be a kvjax Method (Full(), ClusterKV(...), ...), got {method!r}")


def empty_kv(spec: CacheSpec, slots: int) -> tuple[jax.Array, jax.Array]:
    shape = (spec.batch, spec.num_kv_heads, slots, spec.head_dim)
    return jnp.zeros(shape, spec.dtype), jnp.zeros(shape, spec.dtype)
