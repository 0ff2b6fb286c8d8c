"""Streaming KV memory: the state of a `kvjax.StreamSession` and the base of its methods.

A stream (ALGORITHMS.md section 5) is `[init | long-term | short-term]` per decoder layer:
`init` holds the system prompt and user prefix (never evicted), `short-term` the most recent
`short_frames` frames uncompressed (a FIFO), and `long-term` whatever older frames a method
keeps. Keys are stored **pre-RoPE**: the session applies RoPE at attention time with positions
re-indexed contiguously over the attended tokens, so a stream never runs past the positions the
model was trained on.

A `StreamMethod` decides what the long-term memory is: what a clip attends to while it is
encoded (`encode_memory`), how frames leaving the short-term FIFO are stored (`store`), and
which long-term tokens a question attends to (`retrieve`). Everything has a static shape: the
capacities live in `StreamLayout` and in the array shapes; validity comes from the lengths.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax.cache import HEADS, axes
from kvjax.checks import check_count, plain_numbers


@dataclasses.dataclass(frozen=True)
class StreamLayout:
    """Static sizes of a stream, fixed when the session starts."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    init_tokens: int  # init capacity (the init prompt, padded)
    frame_tokens: int  # most tokens one frame may have
    max_position: int  # the model's trained context: attended positions stay below it
    dtype: Any = jnp.float32


@struct.dataclass
class StreamLayer:
    """One decoder layer's stream memory; keys pre-RoPE, `[Hkv, slots, d]`."""

    init_k: jax.Array = axes(HEADS, None, None)
    init_v: jax.Array = axes(HEADS, None, None)
    long_k: jax.Array = axes(HEADS, None, None)  # [Hkv, C, d] (ReKV: in host memory)
    long_v: jax.Array = axes(HEADS, None, None)
    short_k: jax.Array = axes(HEADS, None, None)  # [Hkv, S, d] the short-term FIFO, oldest token first
    short_v: jax.Array = axes(HEADS, None, None)
    # [Hkv, F, d] mean pre-RoPE key per long-term frame (ReKV; F = 0 otherwise)
    frame_keys: jax.Array = axes(HEADS, None, None)


@struct.dataclass
class StreamState:
    """The whole stream: per-layer memory plus the bookkeeping shared by all layers."""

    layers: tuple[StreamLayer, ...]
    init_len: jax.Array  # int32 []
    long_len: jax.Array  # int32 [] valid long-term tokens (the same in every layer)
    short_len: jax.Array  # int32 []
    short_frame: jax.Array  # [S] int32 frame number of each short-term token, -1 when empty
    frame_start: jax.Array  # [F] int32 first long-term slot of each long-term frame (ReKV)
    frame_len: jax.Array  # [F] int32 tokens of each long-term frame (ReKV)
    long_frames: jax.Array  # int32 [] frames in long-term memory (ReKV)


# One segment of attended memory: keys pre-RoPE [Hkv, n, d], values, valid [n] bool (a
# prefix: attention numbers a segment's tokens by their slots, without a scan).
Segment = tuple[jax.Array, jax.Array, jax.Array]


@struct.dataclass
class Moved:
    """Tokens leaving the short-term FIFO after a clip: the oldest frames, a valid prefix."""

    k: jax.Array  # [Hkv, n, d] pre-RoPE
    v: jax.Array
    valid: jax.Array  # [n] bool
    frame: jax.Array  # [n] int32 frame number, -1 when not valid
    scores: jax.Array | None  # [n] float32 attention scores (methods that `needs_scores`)


@dataclasses.dataclass(frozen=True)
class StreamMethod:
    """Base class: the FIFO and the clip size; subclasses define the long-term memory.

    Frames are encoded `clip_frames` at a time against `[init | encode_memory | short-term]`;
    afterwards the oldest frames beyond `short_frames` leave the FIFO through `store`. The
    per-layer hooks run one layer at a time: their `state` is the shared bookkeeping, with
    `layers=()`.
    """

    short_frames: int = 16
    clip_frames: int = 8

    name: ClassVar[str] = "stream"
    needs_scores: ClassVar[bool] = False  # `store` wants attention scores of the clip's last queries
    offloaded: ClassVar[bool] = False  # long-term K/V live in host memory

    # --- checks ------------------------------------------------------------------------------

    def __post_init__(self) -> None:
        plain_numbers(self)
        self.check_hyperparameters()

    def check_hyperparameters(self) -> None:
        """Raise ValueError naming the parameter when a hyperparameter is invalid on its own.
        Runs on construction, so `LiveVLM(short_frames=0)` fails where it is written."""
        check_count("short_frames", self.short_frames, 1)
        check_count("clip_frames", self.clip_frames, 1)

    def validate(self, layout: StreamLayout) -> None:
        """Raise ValueError naming the parameter when the hyperparameters cannot work with
        this stream layout (the checks that need its sizes)."""

    # --- sizes -------------------------------------------------------------------------------

    def short_capacity(self, layout: StreamLayout) -> int:
        return self.short_frames * layout.frame_tokens

    def move_capacity(self, layout: StreamLayout) -> int:
        """Most tokens one clip can push out of the FIFO (at most `clip_frames` frames)."""
        return self.clip_frames * layout.frame_tokens

    def long_capacity(self, layout: StreamLayout, needed: int) -> int:
        """Long-term slots to allocate so that `needed` tokens fit (growing methods)."""
        return max(256, 1 << math.ceil(math.log2(max(needed, 1))))

    def frame_capacity(self, needed: int) -> int:
        """Long-term frame-table entries to allocate (0: the method keeps no frame table)."""
        return 0

    def encode_bound(self, layout: StreamLayout) -> int | None:
        """Most tokens a clip's last query attends to, or None when the stream is unbounded."""
        return None

    def answer_bound(self, layout: StreamLayout, question_tokens: int) -> int | None:
        """Most tokens the last answer token attends to, or None when unbounded."""
        return None

    # --- allocation --------------------------------------------------------------------------

    def init_state(self, layout: StreamLayout) -> StreamState:
        self.validate(layout)
        long_cap = self.long_capacity(layout, self.move_capacity(layout))
        frames = self.frame_capacity(self.clip_frames)
        s = self.short_capacity(layout)
        zeros = lambda n: jnp.zeros((layout.num_kv_heads, n, layout.head_dim), layout.dtype)
        layer = lambda: StreamLayer(
            init_k=zeros(layout.init_tokens), init_v=zeros(layout.init_tokens),
            long_k=self._place(zeros(long_cap)), long_v=self._place(zeros(long_cap)),
            short_k=zeros(s), short_v=zeros(s), frame_keys=zeros(frames),
        )
        scalar = lambda: jnp.zeros((), jnp.int32)  # distinct buffers: the state is donated
        return StreamState(
            layers=tuple(layer() for _ in range(layout.num_layers)),
            init_len=scalar(), long_len=scalar(), short_len=scalar(),
            short_frame=jnp.full((s,), -1, jnp.int32),
            frame_start=jnp.zeros((frames,), jnp.int32), frame_len=jnp.zeros((frames,), jnp.int32),
            long_frames=scalar(),
        )

    def _place(self, x: jax.Array) -> jax.Array:
        """Put a long-term buffer where the method keeps it (device by default)."""
        return x

    def grow(self, state: StreamState, layout: StreamLayout) -> StreamState:
        """Enlarge the long-term buffers (outside jit) when the next clip might not fit.

        Fixed-size methods never grow; growing ones get a new shape (one compile per size).
        """
        move = self.move_capacity(layout)
        long_len, frames = int(state.long_len), int(state.long_frames)
        layer0 = state.layers[0]
        long_cap = self.long_capacity(layout, long_len + move)
        frame_cap = self.frame_capacity(frames + self.clip_frames)
        if long_cap <= layer0.long_k.shape[1] and frame_cap <= layer0.frame_keys.shape[1]:
            return state
        long_cap = max(long_cap, layer0.long_k.shape[1])
        frame_cap = max(frame_cap, layer0.frame_keys.shape[1])

        def pad(x: jax.Array, size: int, axis: int) -> jax.Array:
            extra = size - x.shape[axis]
            if extra == 0:
                return x
            widths = [(0, 0)] * x.ndim
            widths[axis] = (0, extra)
            return jnp.pad(x, widths)

        def pad_long(x: jax.Array) -> jax.Array:
            if not self.offloaded:
                return pad(x, long_cap, 1)
            # Host arrays grow through numpy: the copy never occupies device memory.
            return self._place(np.pad(np.asarray(x), ((0, 0), (0, long_cap - x.shape[1]), (0, 0))))

        layers = tuple(
            layer.replace(long_k=pad_long(layer.long_k), long_v=pad_long(layer.long_v),
                          frame_keys=pad(layer.frame_keys, frame_cap, 1))
            for layer in state.layers
        )
        return state.replace(layers=layers, frame_start=pad(state.frame_start, frame_cap, 0),
                             frame_len=pad(state.frame_len, frame_cap, 0))

    # --- the three per-layer hooks ----------------------------------------------------------

    def encode_memory(self, layout: StreamLayout, layer: StreamLayer, state: StreamState) -> Segment | None:
        """The long-term tokens a clip attends to while it is encoded (None: none)."""
        valid = jnp.arange(layer.long_k.shape[1]) < state.long_len
        return layer.long_k, layer.long_v, valid

    def store(self, layout: StreamLayout, layer: StreamLayer, state: StreamState, moved: Moved,
              long_scores: jax.Array | None) -> StreamLayer:
        """Append the tokens that left the FIFO to the long-term memory. `long_scores` [C]:
        attention scores of the long-term tokens (methods that `needs_scores`)."""
        slot = append_slots(moved.valid, state.long_len, layer.long_k.shape[1])
        return layer.replace(long_k=layer.long_k.at[:, slot].set(moved.k, mode="drop"),
                             long_v=layer.long_v.at[:, slot].set(moved.v, mode="drop"))

    def update_index(self, layout: StreamLayout, state: StreamState, valid: jax.Array, frame: jax.Array) -> StreamState:
        """Shared bookkeeping after every layer's `store`: the new long-term length (and
        frame table). `valid`, `frame`: those of the `Moved` tokens (the same in every layer)."""
        return state.replace(long_len=state.long_len + valid.sum())

    def retrieve(self, layout: StreamLayout, layer: StreamLayer, state: StreamState, q: jax.Array,
                 q_valid: jax.Array) -> Segment:
        """The long-term tokens a question attends to, in temporal order.

        q: [T, Hq, d] the question's pre-RoPE queries at this layer, q_valid: [T]."""
        return self.encode_memory(layout, layer, state)

    def describe(self) -> dict[str, Any]:
        """Name and hyperparameters, for result tables and JSON."""
        return {"method": self.name, **dataclasses.asdict(self)}


def mean_query(q: jax.Array, q_valid: jax.Array, num_kv_heads: int) -> jax.Array:
    """Mean pre-RoPE query per KV head over its group's query heads and the valid question
    tokens: q [T, Hq, d], q_valid [T] -> [Hkv, d] float32 (scores are linear in the query,
    so the mean query gives the mean score)."""
    t, hq, d = q.shape
    w = q_valid.astype(jnp.float32) / jnp.maximum(q_valid.sum(), 1)
    qm = jnp.einsum("t,thd->hd", w, q.astype(jnp.float32))
    return qm.reshape(num_kv_heads, hq // num_kv_heads, d).mean(axis=1)


def append_slots(valid: jax.Array, start: jax.Array, capacity: int) -> jax.Array:
    """Slots `start + i` for the valid prefix of n tokens; `capacity` (dropped) for the rest."""
    return jnp.where(valid, start + jnp.arange(valid.shape[0]), capacity)


def counts_before(x: jax.Array) -> jax.Array:
    """Exclusive prefix sum of a short int vector [n] (frame tables): a triangular product,
    which compiles in a fraction of a scan's time."""
    return jnp.tril(jnp.ones((x.shape[0],) * 2, x.dtype), -1) @ x
