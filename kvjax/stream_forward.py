"""The decoder over a stream's memory: init, clip and question passes, one layer at a time.

These mirror `models.llama.decoder_layer` on one sequence (no batch axis) but own the
attention: stored keys are pre-RoPE, so every pass concatenates the memory segments a
`StreamMethod` chooses, numbers their valid tokens contiguously (0, 1, 2, ... over the
attended sequence, whatever slots they sit in) and rotates keys and queries at those
positions. A stream therefore never attends beyond the positions it re-indexes to.

- `encode_init`: the init prompt, causal, written to the init slots.
- `encode_clip`: one clip of frames, causal inside the clip, against
  `[init | method.encode_memory | short-term]`; then the clip joins the short-term FIFO and
  the oldest frames beyond `short_frames` go to `method.store` (`advance_layer`).
- `question`: the question (and answer prefix) against
  `[init | method.retrieve | short-term]`; returns the first answer logits and a dense
  post-RoPE cache of exactly the attended tokens, which `AnswerDecode` continues in the plain
  decode loop. The stream state is not modified: the question and answer KVs are discarded
  with that cache.

Each pass runs layer by layer: one jitted function per pass kind (`init_layer`, `clip_layer`,
`question_layer`) is compiled once for all layers of a model (they share shapes) and called
once per layer. Compiling a whole model's pass as one program unrolls the layers, and each
layer's sorts, scatters and gathers took 2-4 s to compile on a CPU: minutes for a 30-layer
model. A pass first compiles what it lacks (`Executor.compile`), then dispatches every layer
without waiting, so timings of the run exclude compilation.

Hooks of the method receive the stream's bookkeeping as `state` with `layers=()`.

With a `mesh` (`Executor.mesh`, static in every pass), each pass pins what it returns to the
layout `kvjax.sharding` gives it: memory and answer caches split by KV head over the `model`
axis, hidden states and bookkeeping replicated (a stream has no batch), so every layer's call
matches the one compiled executable.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from kvjax import sharding
from kvjax.attention import decode_attention
from kvjax.cache import BATCH, HEADS, Cache, axes
from kvjax.generation import CAPACITY_ROUND, COMPILE_COUNTS, compiled
from kvjax.methods.base import Method, to_head_major, write_token
from kvjax.methods.stream_memory import Moved, Segment, StreamLayer, StreamLayout, StreamMethod, StreamState
from models.config import ModelConfig
from models.llama import apply_rope, rms_norm, rope_inv_freq
from models.params import LayerParams, Params
from pallas_kernels import MASKED


@dataclasses.dataclass
class Executor:
    """Runs jitted passes compiled once per shape (for `mesh`, when set); `compile_s` sums the
    compilations."""

    mesh: Mesh | None = None
    compile_s: float = 0.0

    def compile(self, jitted, args: tuple, **static) -> Any:
        exe, seconds = compiled(jitted, args, mesh=self.mesh, **static)
        self.compile_s += seconds
        return exe

    def timed(self, run, *args, **kwargs) -> tuple[Any, float]:
        """`run(self, *args, **kwargs)` to completion, and its seconds without compilation."""
        before, t0 = self.compile_s, time.perf_counter()
        out = jax.block_until_ready(run(self, *args, **kwargs))
        return out, time.perf_counter() - t0 - (self.compile_s - before)


def _qkv(p: LayerParams, x: jax.Array, c: ModelConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pre-RoPE q [T, Hq, d], k and v [T, Hkv, d] of one layer for hidden states x [T, D]."""
    h = rms_norm(x, p.attn_norm, c.rms_norm_eps)

    def project(w, b, heads):
        y = h @ w if b is None else h @ w + b
        return y.reshape(x.shape[0], heads, c.head_dim)

    return project(p.wq, p.bq, c.num_heads), project(p.wk, p.bk, c.num_kv_heads), project(p.wv, p.bv, c.num_kv_heads)


def _finish_layer(p: LayerParams, x: jax.Array, attn: jax.Array, c: ModelConfig) -> jax.Array:
    """Output projection, residual and SwiGLU MLP (as `models.llama.decoder_layer`)."""
    x = x + attn.reshape(x.shape[0], -1).astype(x.dtype) @ p.wo
    h = rms_norm(x, p.mlp_norm, c.rms_norm_eps)
    return x + (jax.nn.silu(h @ p.w_gate) * (h @ p.w_up)) @ p.w_down


def _rotate(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """RoPE on head-major x [H, S, d] at positions [S]."""
    return apply_rope(x.transpose(1, 0, 2)[None], positions[None], inv_freq)[0].transpose(1, 0, 2)


class Attended(NamedTuple):
    """What `_attend` computed besides its output."""

    keys: jax.Array  # [Hkv, S + T, d] memory then new keys, rotated at `positions`
    values: jax.Array  # [Hkv, S + T, d]
    valid: jax.Array  # [S + T]
    positions: jax.Array  # [S + T]
    scores: jax.Array | None  # [S + T] (with `score_rows`)


def _attend(
    segments: list[Segment], q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array,
    inv_freq: jax.Array, score_rows: jax.Array | None = None,
) -> tuple[jax.Array, Attended]:
    """New tokens (causal among themselves) against memory segments, RoPE re-indexed.

    q [T, Hq, d], k/v [T, Hkv, d] pre-RoPE, valid [T] (a prefix). The n valid memory tokens
    get positions 0..n-1 in segment order, the new tokens n, n+1, ... `scores`: the mean over
    the rows in `score_rows` and over all heads of the softmax probabilities.
    """
    mem_k = jnp.concatenate([s[0] for s in segments], axis=1)
    mem_v = jnp.concatenate([s[1] for s in segments], axis=1)
    mem_valid = jnp.concatenate([s[2] for s in segments])
    counts = [s[2].sum() for s in segments]
    # Valid tokens are a prefix of each segment: a slot's position is its index plus the
    # valid tokens of the segments before it.
    before = [sum(counts[:i]) for i in range(len(segments))]
    mem_pos = jnp.concatenate([b + jnp.arange(s[2].shape[0]) for b, s in zip(before, segments)])
    t, hq, d = q.shape
    hkv = k.shape[1]
    new_pos = sum(counts) + jnp.arange(t)
    keys = jnp.concatenate([_rotate(mem_k, mem_pos, inv_freq),
                            _rotate(to_head_major(k[None], k.dtype)[0], new_pos, inv_freq)], axis=1)
    values = jnp.concatenate([mem_v, to_head_major(v[None], mem_v.dtype)[0]], axis=1)
    q_rot = apply_rope(q[None], new_pos[None], inv_freq)[0]
    causal = (jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]) & valid[None, :]
    mask = jnp.concatenate([jnp.broadcast_to(mem_valid, (t, mem_valid.shape[0])), causal], axis=1)
    # One batched product per KV head, its group's query heads stacked as rows (g, t): XLA's CPU
    # dot is 1.3-2x faster in this layout than with the group as a separate batch axis.
    g = hq // hkv
    rows = q_rot.reshape(t, hkv, g, d).transpose(1, 2, 0, 3).reshape(hkv, g * t, d).astype(jnp.float32)
    s = jnp.einsum("hqd,hsd->hqs", rows, keys.astype(jnp.float32)) / jnp.sqrt(jnp.float32(d))
    p = jax.nn.softmax(jnp.where(jnp.tile(mask, (g, 1))[None], s, MASKED), axis=-1)
    out = jnp.einsum("hqs,hsd->hqd", p, values.astype(jnp.float32))
    out = out.reshape(hkv, g, t, d).transpose(2, 0, 1, 3).reshape(t, hq, d).astype(q.dtype)
    scores = None
    if score_rows is not None:
        w = score_rows.astype(jnp.float32) / jnp.maximum(score_rows.sum(), 1)
        # An elementwise product and a sum: XLA's CPU dot for this matrix-vector product was 20x slower.
        scores = (p * jnp.tile(w, g)[None, :, None]).sum(axis=(0, 1)) / hq
    return out, Attended(keys, values, jnp.concatenate([mem_valid, valid]), jnp.concatenate([mem_pos, new_pos]), scores)


def _init_segment(layer: StreamLayer, state: StreamState) -> Segment:
    return layer.init_k, layer.init_v, jnp.arange(layer.init_k.shape[1]) < state.init_len


def _short_segment(layer: StreamLayer, state: StreamState) -> Segment:
    return layer.short_k, layer.short_v, jnp.arange(layer.short_k.shape[1]) < state.short_len


# --- init --------------------------------------------------------------------------------------


def init_layer(p: LayerParams, x: jax.Array, valid: jax.Array, *,
               config: ModelConfig, mesh: Mesh | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One layer of the init prompt x [I, D] (valid [I], a prefix): the hidden states and the
    pre-RoPE k, v [Hkv, I, d] for the init slots (the memory's shapes play no part, so one
    compilation serves every method)."""
    COMPILE_COUNTS["stream_init"] += 1
    q, k, v = _qkv(p, x, config)
    nothing = jnp.zeros((k.shape[1], 0, k.shape[2]), k.dtype)
    out, _ = _attend([(nothing, nothing, jnp.zeros((0,), bool))], q, k, v, valid, rope_inv_freq(config))
    k, v = (sharding.constrain_array(to_head_major(a[None], a.dtype)[0], (HEADS, None, None), mesh) for a in (k, v))
    return sharding.constrain_replicated(_finish_layer(p, x, out, config), mesh), k, v


def encode_init(run: Executor, params: Params, state: StreamState, x: jax.Array, valid: jax.Array, *,
                config: ModelConfig) -> StreamState:
    """Encode the init prompt x [I, D] (valid [I], a prefix) into every layer's init slots."""
    exe = run.compile(init_layer_jit, (params.layers[0], x, valid), config=config)
    layers = []
    for p, layer in zip(params.layers, state.layers):
        x, k, v = exe(p, x, valid)
        layers.append(layer.replace(init_k=k.astype(layer.init_k.dtype), init_v=v.astype(layer.init_v.dtype)))
    return state.replace(layers=tuple(layers), init_len=valid.sum().astype(jnp.int32))


# --- clips -------------------------------------------------------------------------------------


class FifoPlan(NamedTuple):
    """Where the tokens of [short-term | clip] go after a clip; indices into the
    concatenation of the short-term slots and the clip slots."""

    move: jax.Array  # [move_capacity] tokens leaving the FIFO, oldest first
    move_valid: jax.Array  # [move_capacity] bool, a prefix
    move_frame: jax.Array  # [move_capacity] frame numbers (-1: not valid)
    keep: jax.Array  # [short_capacity] tokens staying, oldest first
    keep_frame: jax.Array  # [short_capacity] frame numbers (-1: empty slot)
    short_len: jax.Array  # int32 [] tokens staying


def fifo_plan(state: StreamState, frame: jax.Array, method: StreamMethod, layout: StreamLayout) -> FifoPlan:
    """The FIFO after a clip of frame numbers `frame` [T] (-1: padding): tokens of frames older
    than the newest `short_frames` leave it (a prefix of [short-term | clip])."""
    t = frame.shape[0]
    s_cap, move_cap = method.short_capacity(layout), method.move_capacity(layout)
    total = state.short_len + (frame >= 0).sum()

    def source(j: jax.Array) -> jax.Array:
        """Index into concat(short-term slots, clip slots) of the j-th token of [short | clip]."""
        return jnp.clip(jnp.where(j < state.short_len, j, s_cap + j - state.short_len), 0, s_cap + t - 1)

    frames = jnp.concatenate([state.short_frame, frame])
    last_frame = jnp.max(jnp.where(jnp.arange(s_cap + t) < total, frames[source(jnp.arange(s_cap + t))], -1))
    move = source(jnp.arange(move_cap))
    move_valid = (jnp.arange(move_cap) < total) & (frames[move] <= last_frame - method.short_frames)
    n_move = move_valid.sum()
    keep_j = n_move + jnp.arange(s_cap)
    keep = source(keep_j)
    return FifoPlan(move=move, move_valid=move_valid, move_frame=jnp.where(move_valid, frames[move], -1),
                    keep=keep, keep_frame=jnp.where(keep_j < total, frames[keep], -1),
                    short_len=(total - n_move).astype(jnp.int32))


def advance_layer(
    layer: StreamLayer, state: StreamState, k: jax.Array, v: jax.Array, frame: jax.Array,
    long_scores: jax.Array | None, fifo_scores: jax.Array | None, *, method: StreamMethod, layout: StreamLayout,
) -> StreamLayer:
    """One layer's memory after a clip: the clip's pre-RoPE k/v [Hkv, T, d] join the FIFO, the
    tokens leaving it go to `method.store`. Scores (methods that `needs_scores`): of the
    long-term slots [C] and of [short-term slots | clip slots]."""
    plan = fifo_plan(state, frame, method, layout)
    both_k = jnp.concatenate([layer.short_k, k.astype(layer.short_k.dtype)], axis=1)
    both_v = jnp.concatenate([layer.short_v, v.astype(layer.short_v.dtype)], axis=1)
    moved = Moved(k=both_k[:, plan.move], v=both_v[:, plan.move], valid=plan.move_valid, frame=plan.move_frame,
                  scores=None if fifo_scores is None else fifo_scores[plan.move])
    layer = layer.replace(short_k=both_k[:, plan.keep], short_v=both_v[:, plan.keep])
    return method.store(layout, layer, state, moved, long_scores)


def clip_layer(
    p: LayerParams, layer: StreamLayer, state: StreamState, x: jax.Array, frame: jax.Array, *,
    config: ModelConfig, method: StreamMethod, layout: StreamLayout, mesh: Mesh | None = None,
) -> tuple[jax.Array, StreamLayer]:
    """One layer of a clip: x [T, D] frame embeddings, frame [T] int32 frame numbers (-1: padding)."""
    COMPILE_COUNTS["stream_encode"] += 1
    t = x.shape[0]
    valid = frame >= 0
    score_rows = None
    if method.needs_scores:  # the last `score_queries` queries of the clip
        score_rows = valid & (jnp.arange(t) >= valid.sum() - method.score_queries)
    q, k, v = _qkv(p, x, config)
    long = method.encode_memory(layout, layer, state)
    segments = [_init_segment(layer, state), *([long] if long is not None else []), _short_segment(layer, state)]
    out, att = _attend(segments, q, k, v, valid, rope_inv_freq(config), score_rows)
    long_scores = fifo_scores = None
    if att.scores is not None:
        i0 = layer.init_k.shape[1]
        long_scores, fifo_scores = att.scores[i0 : i0 + long[0].shape[1]], att.scores[i0 + long[0].shape[1]:]
    new_k, new_v = (to_head_major(a[None], a.dtype)[0] for a in (k, v))
    layer = advance_layer(layer, state, new_k, new_v, frame, long_scores, fifo_scores, method=method, layout=layout)
    return sharding.constrain_replicated(_finish_layer(p, x, out, config), mesh), sharding.constrain(layer, mesh)


def finish_clip(state: StreamState, frame: jax.Array, *, method: StreamMethod, layout: StreamLayout,
                mesh: Mesh | None = None) -> StreamState:
    """The bookkeeping after every layer has advanced (`state` without layers)."""
    COMPILE_COUNTS["stream_finish"] += 1
    plan = fifo_plan(state, frame, method, layout)
    state = method.update_index(layout, state, plan.move_valid, plan.move_frame)
    return sharding.constrain(state.replace(short_len=plan.short_len, short_frame=plan.keep_frame), mesh)


def encode_clip(
    run: Executor, params: Params, state: StreamState, x: jax.Array, frame: jax.Array, *,
    config: ModelConfig, method: StreamMethod, layout: StreamLayout,
) -> StreamState:
    """Encode one clip through every layer (the layers' memory is donated)."""
    meta = state.replace(layers=())
    static = dict(method=method, layout=layout)
    layer_exe = run.compile(clip_layer_jit, (params.layers[0], state.layers[0], meta, x, frame), config=config, **static)
    finish_exe = run.compile(finish_clip_jit, (meta, frame), **static)
    layers = []
    for p, layer in zip(params.layers, state.layers):
        x, layer = layer_exe(p, layer, meta, x, frame)
        layers.append(layer)
    return finish_exe(meta, frame).replace(layers=tuple(layers))


# --- questions ---------------------------------------------------------------------------------


@struct.dataclass
class AnswerLayerCache:
    """One layer's attended tokens post-RoPE, `[1, Hkv, capacity, d]`, slot == position.

    Layers attend different numbers of memory tokens (each retrieves its own), but the decode
    loop gives every layer the same next position. So each layer's tokens are shifted to end
    where the question starts, at the memory's static size (RoPE scores depend only on
    position differences); slots below `start` are empty.
    """

    k: jax.Array = axes(BATCH, HEADS, None, None)
    v: jax.Array = axes(BATCH, HEADS, None, None)
    start: jax.Array = axes(BATCH)  # [1] int32 first occupied slot


@dataclasses.dataclass(frozen=True)
class AnswerDecode(Method):
    """Dense decode over `AnswerLayerCache`s (the answer after a stream question)."""

    name = "stream_answer"

    def attend(self, layer, cache: AnswerLayerCache, q, k, v, lengths):
        k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)
        slots = jnp.arange(cache.k.shape[2])[None, :]
        valid = (slots >= cache.start[:, None]) & (slots < lengths[:, None])
        out = decode_attention(q, cache.k, cache.v, valid, current=(k, v))
        return out, cache.replace(k=write_token(cache.k, lengths, k), v=write_token(cache.v, lengths, v))


def question_layer(
    p: LayerParams, layer: StreamLayer, state: StreamState, x: jax.Array, valid: jax.Array, *,
    config: ModelConfig, method: StreamMethod, layout: StreamLayout, extra: int, mesh: Mesh | None = None,
) -> tuple[jax.Array, AnswerLayerCache, jax.Array]:
    """One layer of a question x [Tq, D] (valid [Tq], a prefix) against the retrieved memory.

    Returns the hidden states, the layer's answer cache (room for `extra` more tokens) and the
    answer's next slot.
    """
    COMPILE_COUNTS["stream_question"] += 1
    q, k, v = _qkv(p, x, config)
    segments = [_init_segment(layer, state), method.retrieve(layout, layer, state, q, valid),
                _short_segment(layer, state)]
    inv_freq = rope_inv_freq(config)
    out, att = _attend(segments, q, k, v, valid, inv_freq)
    memory = sum(s[2].shape[0] for s in segments)
    capacity = CAPACITY_ROUND * math.ceil((memory + x.shape[0] + extra) / CAPACITY_ROUND)
    start = memory - att.valid[:memory].sum()  # the shift: a further rotation by `start` positions
    slots = jnp.where(att.valid, att.positions + start, capacity)
    keys = _rotate(att.keys, jnp.full(slots.shape, start), inv_freq)
    dense = lambda src: jnp.zeros((1, src.shape[0], capacity, src.shape[2]), layer.short_v.dtype).at[0, :, slots].set(
        src.transpose(1, 0, 2).astype(layer.short_v.dtype), mode="drop")
    cache = AnswerLayerCache(dense(keys), dense(att.values), jnp.reshape(start, (1,)).astype(jnp.int32))
    x, length = sharding.constrain_replicated((_finish_layer(p, x, out, config), (memory + valid.sum()).astype(jnp.int32)),
                                              mesh)
    return x, sharding.constrain(cache, mesh), length


def question_logits(head: Params, x: jax.Array, valid: jax.Array, *, config: ModelConfig,
                    mesh: Mesh | None = None) -> jax.Array:
    """Logits [1, V] after the last valid token of x [Tq, D] (`head`: params without layers)."""
    COMPILE_COUNTS["stream_logits"] += 1
    last = jnp.maximum(valid.sum() - 1, 0)
    logits = head.logits(rms_norm(x[last][None], head.final_norm, config.rms_norm_eps)).astype(jnp.float32)
    return sharding.constrain_replicated(logits, mesh)


def question(
    run: Executor, params: Params, state: StreamState, x: jax.Array, valid: jax.Array, *,
    config: ModelConfig, method: StreamMethod, layout: StreamLayout, extra: int,
) -> tuple[jax.Array, Cache]:
    """The first answer logits [1, V] and the `AnswerDecode` cache of every layer; the stream
    state is read, not modified."""
    meta, head = state.replace(layers=()), params.replace(layers=())
    layer_exe = run.compile(question_layer_jit, (params.layers[0], state.layers[0], meta, x, valid),
                            config=config, method=method, layout=layout, extra=extra)
    logits_exe = run.compile(question_logits_jit, (head, x, valid), config=config)
    layers = []
    for p, layer in zip(params.layers, state.layers):
        x, cache, length = layer_exe(p, layer, meta, x, valid)
        layers.append(cache)
    return logits_exe(head, x, valid), Cache(layers=tuple(layers), lengths=jnp.reshape(length, (1,)))


init_layer_jit = jax.jit(init_layer, static_argnames=("config", "mesh"))
clip_layer_jit = jax.jit(clip_layer, static_argnames=("config", "method", "layout", "mesh"), donate_argnames=("layer",))
finish_clip_jit = jax.jit(finish_clip, static_argnames=("method", "layout", "mesh"))
question_layer_jit = jax.jit(question_layer, static_argnames=("config", "method", "layout", "extra", "mesh"))
question_logits_jit = jax.jit(question_logits, static_argnames=("config", "mesh"))
