"""Parameter pytrees of the decoder.

Linear weights are stored `[in, out]` (the transpose of PyTorch's `nn.Linear.weight`), so a
projection is `x @ w`. Q and K rows are in Hugging Face order (rotate-half RoPE), i.e. any
llama.cpp permutation has already been undone by the loader.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from models.config import ModelConfig


@struct.dataclass
class LayerParams:
    attn_norm: jax.Array  # [D]
    wq: jax.Array  # [D, Hq*d]
    wk: jax.Array  # [D, Hkv*d]
    wv: jax.Array  # [D, Hkv*d]
    wo: jax.Array  # [Hq*d, D]
    mlp_norm: jax.Array  # [D]
    w_gate: jax.Array  # [D, F]
    w_up: jax.Array  # [D, F]
    w_down: jax.Array  # [F, D]
    bq: jax.Array | None = None  # [Hq*d], Qwen2 only
    bk: jax.Array | None = None  # [Hkv*d]
    bv: jax.Array | None = None  # [Hkv*d]


@struct.dataclass
class Params:
    embed: jax.Array  # [V, D]
    layers: tuple[LayerParams, ...]
    final_norm: jax.Array  # [D]
    lm_head: jax.Array | None = None  # [D, V]; None when the embeddings are tied

    def logits(self, x: jax.Array) -> jax.Array:
        """Hidden states `[..., D]` -> logits `[..., V]` (the tied embedding when no lm_head).

        The tied case contracts with `embed` `[V, D]` directly: `embed.T @` would make XLA
        materialise a transposed copy of the whole embedding.
        """
        if self.lm_head is None:
            return jnp.einsum("...d,vd->...v", x, self.embed)
        return x @ self.lm_head


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Expected shape of every per-layer field, for loaders to validate against."""
    c = config
    shapes = {
        "attn_norm": (c.hidden_size,),
        "wq": (c.hidden_size, c.num_heads * c.head_dim),
        "wk": (c.hidden_size, c.num_kv_heads * c.head_dim),
        "wv": (c.hidden_size, c.num_kv_heads * c.head_dim),
        "wo": (c.num_heads * c.head_dim, c.hidden_size),
        "mlp_norm": (c.hidden_size,),
        "w_gate": (c.hidden_size, c.intermediate_size),
        "w_up": (c.hidden_size, c.intermediate_size),
        "w_down": (c.intermediate_size, c.hidden_size),
    }
    if c.attention_bias:
        shapes |= {
            "bq": (c.num_heads * c.head_dim,),
            "bk": (c.num_kv_heads * c.head_dim,),
            "bv": (c.num_kv_heads * c.head_dim,),
        }
    return shapes


def init_random(config: ModelConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> Params:
    """Random parameters of the right shapes (benchmarks beyond the embedded model's size)."""
    shapes = param_shapes(config)
    keys = jax.random.split(key, config.num_layers + 2)

    def layer(k):
        ks = jax.random.split(k, len(shapes))
        fields = {}
        for kk, (name, shape) in zip(ks, shapes.items()):
            if name.endswith("norm"):
                fields[name] = jnp.ones(shape, dtype)
            else:
                fields[name] = (scale * jax.random.normal(kk, shape)).astype(dtype)
        return LayerParams(**fields)

    embed = (scale * jax.random.normal(keys[0], (config.vocab_size, config.hidden_size))).astype(dtype)
    lm_head = None
    if not config.tie_word_embeddings:
        lm_head = (scale * jax.random.normal(keys[1], (config.hidden_size, config.vocab_size))).astype(dtype)
    return Params(
        embed=embed,
        layers=tuple(layer(k) for k in keys[2:]),
        final_norm=jnp.ones((config.hidden_size,), dtype),
        lm_head=lm_head,
    )
