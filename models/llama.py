"""Functional decoder for the Llama family (Llama 2/3/3.1, Mistral, SmolLM2) and Qwen2.

One readable file: RMSNorm, rotary embeddings (with Llama 3.1 frequency scaling), grouped
query attention delegated to a KV-cache *method*, and a SwiGLU MLP. The model never looks
inside the cache: the method owns the layer caches, the model only hands it post-RoPE
queries, keys and values.

Batching uses right padding: token `t` of sequence `b` sits at position `t`, padded slots
carry position -1 and are never attended. Sequence lengths therefore differ per row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.cache import Cache
from kvjax.methods.base import Method
from models.config import ModelConfig
from models.params import LayerParams, Params


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, cast back to the input dtype (as `transformers` does)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def rope_inv_freq(config: ModelConfig) -> jax.Array:
    """Rotary inverse frequencies `[d/2]`, with Llama 3.1 scaling when configured."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * jnp.pi / inv_freq
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate-half RoPE. `x`: [B, T, H, d], `positions`: [B, T] (negative = padding)."""
    angles = jnp.maximum(positions, 0)[..., None].astype(jnp.float32) * inv_freq  # [B, T, d/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def _project(x: jax.Array, w: jax.Array, b: jax.Array | None, heads: int, d: int) -> jax.Array:
    y = x @ w
    if b is not None:
        y = y + b
    return y.reshape(*x.shape[:-1], heads, d)


def decoder_layer(
    layer: int,
    p: LayerParams,
    x: jax.Array,
    positions: jax.Array,
    lengths: jax.Array,
    layer_cache,
    method: Method,
    config: ModelConfig,
    inv_freq: jax.Array,
):
    """One pre-norm transformer block. Returns the new hidden states and layer cache."""
    c = config
    h = rms_norm(x, p.attn_norm, c.rms_norm_eps)
    q = apply_rope(_project(h, p.wq, p.bq, c.num_heads, c.head_dim), positions, inv_freq)
    k = apply_rope(_project(h, p.wk, p.bk, c.num_kv_heads, c.head_dim), positions, inv_freq)
    v = _project(h, p.wv, p.bv, c.num_kv_heads, c.head_dim)
    if x.shape[1] == 1:  # one decode step
        attn, layer_cache = method.attend(layer, layer_cache, q[:, 0], k[:, 0], v[:, 0], lengths)
        attn = attn[:, None]
    else:
        attn, layer_cache = method.prefill(layer, layer_cache, q, k, v, lengths)
    x = x + attn.reshape(*x.shape[:-1], -1).astype(x.dtype) @ p.wo
    h = rms_norm(x, p.mlp_norm, c.rms_norm_eps)
    x = x + (jax.nn.silu(h @ p.w_gate) * (h @ p.w_up)) @ p.w_down
    return x, layer_cache


def forward(
    params: Params,
    tokens: jax.Array,
    positions: jax.Array,
    cache: Cache,
    method: Method,
    *,
    config: ModelConfig,
    last_only: bool = False,
) -> tuple[jax.Array, Cache]:
    """Run the decoder over `tokens` and return `(logits, new_cache)`.

    - `tokens`, `positions`: int `[B, T]`. With `T > 1` this is a prefill into an empty
      cache (`positions` are `0..len-1`, then -1 for right padding); with `T == 1` it is one
      decode step at position `cache.lengths`.
    - `last_only`: return logits only at each sequence's last valid position (`[B, 1, V]`),
      which avoids the `[B, T, V]` output matrix for long prompts.
    """
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens must be integer token ids [B, T], got {tokens.dtype} {tuple(tokens.shape)}")
    return forward_embeddings(
        params, params.embed[tokens], positions, cache, method, config=config, last_only=last_only
    )


def check_inputs(params: Params, x: jax.Array, positions: jax.Array, cache: Cache, config: ModelConfig) -> None:
    """Refuse inputs whose shapes do not fit the model or each other, naming the argument.

    Shapes are static, so this costs nothing at run time. A cache with fewer layers than the
    model would otherwise run only those layers (`zip`) and return wrong logits silently; the
    other mismatches would surface as XLA broadcasting errors deep inside attention."""
    if x.ndim != 3 or x.shape[-1] != config.hidden_size:
        raise ValueError(f"input embeddings must be [B, T, hidden_size={config.hidden_size}], got {tuple(x.shape)}")
    if tuple(positions.shape) != tuple(x.shape[:2]) or not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"positions must be integers shaped like the tokens {tuple(x.shape[:2])}, "
                         f"got {positions.dtype} {tuple(positions.shape)}")
    if len(params.layers) != config.num_layers:
        raise ValueError(f"params hold {len(params.layers)} layers, config.num_layers is {config.num_layers}")
    if len(cache.layers) != config.num_layers:
        raise ValueError(f"cache holds {len(cache.layers)} layers, the model has {config.num_layers} "
                         f"(build it with init_cache(method, CacheSpec(num_layers={config.num_layers}, ...)))")
    if tuple(cache.lengths.shape) != (x.shape[0],):
        raise ValueError(f"cache holds {cache.lengths.shape[0] if cache.lengths.ndim else 0} sequences "
                         f"(CacheSpec.batch), the tokens {x.shape[0]}")


def forward_embeddings(
    params: Params,
    x: jax.Array,
    positions: jax.Array,
    cache: Cache,
    method: Method,
    *,
    config: ModelConfig,
    last_only: bool = False,
) -> tuple[jax.Array, Cache]:
    """`forward` on input embeddings `x` `[B, T, D]` instead of token ids.

    Multimodal models (LLaVA-OneVision) call this after writing vision features into the
    embedded prompt; everything else is as in `forward`.
    """
    check_inputs(params, x, positions, cache, config)
    inv_freq = rope_inv_freq(config)
    if x.shape[1] == 1:
        lengths = cache.lengths  # tokens already cached = position of this token
        new_lengths = lengths + 1
        layers = method.begin_decode_step(cache.layers, lengths)
    else:
        lengths = jnp.sum(positions >= 0, axis=1).astype(jnp.int32)
        new_lengths = lengths
        layers = cache.layers
    new_layers = []
    for i, (p, layer_cache) in enumerate(zip(params.layers, layers)):
        x, layer_cache = decoder_layer(
            i, p, x, positions, lengths, layer_cache, method, config, inv_freq
        )
        new_layers.append(layer_cache)
    if last_only and x.shape[1] > 1:
        x = jnp.take_along_axis(x, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)
    x = rms_norm(x, params.final_norm, config.rms_norm_eps)
    logits = params.logits(x).astype(jnp.float32)
    return logits, Cache(layers=tuple(new_layers), lengths=new_lengths)
