"""The decoder over a stream's memory: jitted init, clip and question passes.

These mirror `models.llama.decoder_layer` on one sequence (no batch axis) but own the
attention: stored keys are pre-RoPE, so every pass concatenates the memory segments a
`StreamMethod` chooses, numbers their valid tokens contiguously (0, 1, 2, ... over the
attended sequence, whatever slots they sit in) and rotates keys and queries at those
positions. A stream therefore never attends beyond the positions it re-indexes to.

- `encode_init`: the init prompt, causal, written to the init slots.
- `encode_clip`: one clip of frames, causal inside the clip, against
  `[init | method.encode_memory | short-term]`; then the clip joins the short-term FIFO and
  the oldest frames beyond `short_frames` go to `method.store`.
- `question`: the question (and answer prefix) against
  `[init | method.retrieve | short-term]`; returns the first answer logits and a dense
  post-RoPE cache of exactly the attended tokens, which a plain `Full()` decode loop continues.
  The stream state is not modified: the question and answer KVs are discarded with that cache.

With `mesh` (static), each pass returns its state or cache in the layout `kvjax.sharding`
gives it on that mesh: KV heads split over the `model` axis (a stream has no batch).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from kvjax import sharding
from kvjax.cache import Cache
from kvjax.generation import COMPILE_COUNTS, CAPACITY_ROUND
from kvjax.methods.base import prefix_sum, to_head_major
from kvjax.methods.full import DenseLayerCache
from kvjax.methods.stream_memory import Moved, Segment, StreamLayout, StreamMethod, StreamState
from models.config import ModelConfig
from models.llama import apply_rope, rms_norm, rope_inv_freq
from models.params import LayerParams, Params
from pallas_kernels import MASKED


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


def _attend(
    segments: list[Segment], q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array,
    inv_freq: jax.Array, score_rows: jax.Array | None = None,
):
    """New tokens (causal among themselves) against memory segments, RoPE re-indexed.

    q [T, Hq, d], k/v [T, Hkv, d] pre-RoPE, valid [T] (a prefix). Memory tokens get positions
    0..n-1 in segment order, the new tokens n, n+1, ... Returns (out [T, Hq, d], rotated
    memory keys [Hkv, S, d], memory values, memory valid [S], memory positions [S], n,
    rotated new keys [Hkv, T, d], scores [S + T] or None). `scores`: the mean over the rows in
    `score_rows` and over all heads of the softmax probabilities.
    """
    mem_k = jnp.concatenate([s[0] for s in segments], axis=1)
    mem_v = jnp.concatenate([s[1] for s in segments], axis=1)
    mem_valid = jnp.concatenate([s[2] for s in segments])
    mem_pos = prefix_sum(mem_valid.astype(jnp.int32)) - 1
    n = mem_valid.sum()
    t, hq, d = q.shape
    hkv = k.shape[1]
    new_pos = n + jnp.arange(t)
    mem_rot = _rotate(mem_k, mem_pos, inv_freq)
    new_k = _rotate(to_head_major(k[None], k.dtype)[0], new_pos, inv_freq)
    q_rot = apply_rope(q[None], new_pos[None], inv_freq)[0]
    keys = jnp.concatenate([mem_rot, new_k], axis=1).astype(jnp.float32)
    values = jnp.concatenate([mem_v, to_head_major(v[None], v.dtype)[0]], axis=1).astype(jnp.float32)
    causal = (jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]) & valid[None, :]
    mask = jnp.concatenate([jnp.broadcast_to(mem_valid, (t, mem_valid.shape[0])), causal], axis=1)
    qg = q_rot.reshape(t, hkv, hq // hkv, d).astype(jnp.float32)
    s = jnp.einsum("thgd,hsd->hgts", qg, keys) / jnp.sqrt(jnp.float32(d))
    p = jax.nn.softmax(jnp.where(mask, s, MASKED), axis=-1)
    out = jnp.einsum("hgts,hsd->thgd", p, values).reshape(t, hq, d).astype(q.dtype)
    scores = None
    if score_rows is not None:
        w = score_rows.astype(jnp.float32) / jnp.maximum(score_rows.sum(), 1)
        scores = jnp.einsum("hgts,t->s", p, w) / hq
    return out, mem_rot, mem_v, mem_valid, mem_pos, n, new_k, scores


def encode_init(params: Params, state: StreamState, x: jax.Array, valid: jax.Array, *, config: ModelConfig,
                mesh: Mesh | None = None) -> StreamState:
    """Encode the init prompt x [I, D] (valid [I], a prefix) into the init slots."""
    COMPILE_COUNTS["stream_init"] += 1
    inv_freq = rope_inv_freq(config)
    layers = []
    for p, layer in zip(params.layers, state.layers):
        q, k, v = _qkv(p, x, config)
        nothing = jnp.zeros_like(layer.init_k[:, :0])
        out, *_ = _attend([(nothing, nothing, jnp.zeros((0,), bool))], q, k, v, valid, inv_freq)
        x = _finish_layer(p, x, out, config)
        layers.append(layer.replace(init_k=to_head_major(k[None], layer.init_k.dtype)[0],
                                    init_v=to_head_major(v[None], layer.init_v.dtype)[0]))
    return sharding.constrain(state.replace(layers=tuple(layers), init_len=valid.sum().astype(jnp.int32)), mesh)


def encode_clip(
    params: Params, state: StreamState, x: jax.Array, frame: jax.Array, *,
    config: ModelConfig, method: StreamMethod, layout: StreamLayout, mesh: Mesh | None = None,
) -> StreamState:
    """Encode one clip: x [T, D] frame embeddings, frame [T] int32 frame numbers (-1: padding).

    The clip's tokens join the short-term FIFO; tokens of frames older than the newest
    `short_frames` leave it (a prefix of [short-term | clip]) and are stored by the method.
    """
    COMPILE_COUNTS["stream_encode"] += 1
    inv_freq = rope_inv_freq(config)
    t = x.shape[0]
    s_cap, move_cap = method.short_capacity(layout), method.move_capacity(layout)
    valid = frame >= 0
    total = state.short_len + valid.sum()  # tokens in [short-term | clip]

    def source(j: jax.Array) -> jax.Array:
        """Index into concat(short-term slots, clip slots) of the j-th token of [short | clip]."""
        return jnp.clip(jnp.where(j < state.short_len, j, s_cap + j - state.short_len), 0, s_cap + t - 1)

    all_frames = jnp.concatenate([state.short_frame, frame])
    last_frame = jnp.max(jnp.where(jnp.arange(s_cap + t) < total, all_frames[source(jnp.arange(s_cap + t))], -1))
    move_j = jnp.arange(move_cap)
    move_frames = all_frames[source(move_j)]
    move_valid = (move_j < total) & (move_frames <= last_frame - method.short_frames)
    n_move = move_valid.sum()
    keep_j = n_move + jnp.arange(s_cap)
    keep_valid = keep_j < total
    score_rows = None
    if method.needs_scores:  # the last `score_queries` queries of the clip
        score_rows = valid & (jnp.arange(t) >= valid.sum() - method.score_queries)

    layers, moved = [], None
    for p, layer in zip(params.layers, state.layers):
        q, k, v = _qkv(p, x, config)
        long = method.encode_memory(layout, layer, state)
        segments = [
            (layer.init_k, layer.init_v, jnp.arange(layer.init_k.shape[1]) < state.init_len),
            *([long] if long is not None else []),
            (layer.short_k, layer.short_v, jnp.arange(s_cap) < state.short_len),
        ]
        out, *_, scores = _attend(segments, q, k, v, valid, inv_freq, score_rows)
        x = _finish_layer(p, x, out, config)

        both_k = jnp.concatenate([layer.short_k, to_head_major(k[None], layer.short_k.dtype)[0]], axis=1)
        both_v = jnp.concatenate([layer.short_v, to_head_major(v[None], layer.short_v.dtype)[0]], axis=1)
        long_scores = moved_scores = None
        if scores is not None:
            i0 = layer.init_k.shape[1]
            long_scores = scores[i0 : i0 + long[0].shape[1]]
            moved_scores = scores[i0 + long[0].shape[1]:][source(move_j)]
        moved = Moved(k=both_k[:, source(move_j)], v=both_v[:, source(move_j)], valid=move_valid,
                      frame=jnp.where(move_valid, move_frames, -1), scores=moved_scores)
        layer = layer.replace(short_k=both_k[:, source(keep_j)], short_v=both_v[:, source(keep_j)])
        layers.append(method.store(layout, layer, state, moved, long_scores))

    state = method.update_index(layout, state, moved)
    return sharding.constrain(state.replace(
        layers=tuple(layers),
        short_len=(total - n_move).astype(jnp.int32),
        short_frame=jnp.where(keep_valid, all_frames[source(keep_j)], -1),
    ), mesh)


def question(
    params: Params, state: StreamState, x: jax.Array, valid: jax.Array, *,
    config: ModelConfig, method: StreamMethod, layout: StreamLayout, extra: int, mesh: Mesh | None = None,
) -> tuple[jax.Array, Cache]:
    """Prefill a question x [Tq, D] (valid [Tq], a prefix) against the retrieved memory.

    Returns the logits after its last token [1, V] and a `Full()` cache [1, Hkv, A, d] holding
    exactly the attended tokens post-RoPE at their re-indexed positions, followed by the
    question, with room for `extra` generated tokens.
    """
    COMPILE_COUNTS["stream_question"] += 1
    inv_freq = rope_inv_freq(config)
    t = x.shape[0]
    s_cap = method.short_capacity(layout)
    layers = []
    length = None
    for p, layer in zip(params.layers, state.layers):
        q, k, v = _qkv(p, x, config)
        segments = [
            (layer.init_k, layer.init_v, jnp.arange(layer.init_k.shape[1]) < state.init_len),
            method.retrieve(layout, layer, state, q, valid),
            (layer.short_k, layer.short_v, jnp.arange(s_cap) < state.short_len),
        ]
        out, mem_rot, mem_v, mem_valid, mem_pos, n, new_k, _ = _attend(segments, q, k, v, valid, inv_freq)
        x = _finish_layer(p, x, out, config)
        capacity = CAPACITY_ROUND * math.ceil((mem_valid.shape[0] + t + extra) / CAPACITY_ROUND)
        slots = jnp.concatenate([jnp.where(mem_valid, mem_pos, capacity), jnp.where(valid, n + jnp.arange(t), capacity)])
        keys = jnp.concatenate([mem_rot, new_k], axis=1)
        values = jnp.concatenate([mem_v, to_head_major(v[None], mem_v.dtype)[0]], axis=1)
        dense = lambda src: jnp.zeros((1, src.shape[0], capacity, src.shape[2]), mem_v.dtype).at[0, :, slots].set(
            src.transpose(1, 0, 2).astype(mem_v.dtype), mode="drop")
        layers.append(DenseLayerCache(dense(keys), dense(values)))
        length = n + valid.sum()
    last = jnp.maximum(valid.sum() - 1, 0)
    h = rms_norm(x[last][None], params.final_norm, config.rms_norm_eps)
    logits = params.logits(h).astype(jnp.float32)
    cache = Cache(layers=tuple(layers), lengths=jnp.reshape(length, (1,)).astype(jnp.int32))
    return sharding.constrain_replicated(logits, mesh), sharding.constrain(cache, mesh)


encode_init_jit = jax.jit(encode_init, static_argnames=("config", "mesh"), donate_argnames=("state",))
encode_clip_jit = jax.jit(encode_clip, static_argnames=("config", "method", "layout", "mesh"),
                          donate_argnames=("state",))
question_jit = jax.jit(question, static_argnames=("config", "method", "layout", "extra", "mesh"))
