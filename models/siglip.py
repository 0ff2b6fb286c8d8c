"""SigLIP vision tower (the image encoder of LLaVA-OneVision), functional on a param pytree.

Patch embedding (a stride-`p` convolution, written as a matmul over flattened patches),
learned position embeddings, pre-norm encoder layers (LayerNorm, multi-head attention without
mask, GELU-tanh MLP) and a post-layernorm. `hidden_states` returns what `transformers` calls
`hidden_states`: the embeddings, then each layer's output *before* the post-layernorm, which is
what LLaVA-OneVision's `vision_feature_layer` indexes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

# GELU variants by their `transformers` activation names.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def activation(name: str, key: str) -> Callable[[jax.Array], jax.Array]:
    """The activation called `name` in `transformers`; `key` names the config field for errors."""
    if name not in ACTIVATIONS:
        raise ValueError(f"{key}={name!r} is not supported; expected one of {tuple(ACTIVATIONS)}")
    return ACTIVATIONS[name]


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
    """Vision tower hyperparameters (an HF `SiglipVisionConfig`)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be a multiple of num_attention_heads={self.num_heads}"
            )
        activation(self.hidden_act, "hidden_act")

    @property
    def grid(self) -> int:
        """Patches per side (27 for SigLIP-so400m: 384 px // 14 px)."""
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> SiglipConfig:
        """From an HF vision config dict; absent keys take `SiglipVisionConfig`'s defaults."""
        return cls(
            hidden_size=int(cfg.get("hidden_size", 768)),
            intermediate_size=int(cfg.get("intermediate_size", 3072)),
            num_layers=int(cfg.get("num_hidden_layers", 12)),
            num_heads=int(cfg.get("num_attention_heads", 12)),
            image_size=int(cfg.get("image_size", 224)),
            patch_size=int(cfg.get("patch_size", 16)),
            num_channels=int(cfg.get("num_channels", 3)),
            layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-6)),
            hidden_act=cfg.get("hidden_act", "gelu_pytorch_tanh"),
        )


@struct.dataclass
class SiglipLayerParams:
    ln1_w: jax.Array  # [D]
    ln1_b: jax.Array
    wq: jax.Array  # [D, D] (in, out)
    bq: jax.Array  # [D]
    wk: jax.Array
    bk: jax.Array
    wv: jax.Array
    bv: jax.Array
    wo: jax.Array
    bo: jax.Array
    ln2_w: jax.Array
    ln2_b: jax.Array
    fc1_w: jax.Array  # [D, F]
    fc1_b: jax.Array  # [F]
    fc2_w: jax.Array  # [F, D]
    fc2_b: jax.Array  # [D]


@struct.dataclass
class SiglipParams:
    patch_w: jax.Array  # [C*p*p, D]: the conv kernel flattened in (channel, row, column) order
    patch_b: jax.Array  # [D]
    pos: jax.Array  # [grid*grid, D]
    layers: tuple[SiglipLayerParams, ...]
    post_ln_w: jax.Array  # [D]
    post_ln_b: jax.Array


# SiglipLayerParams field -> HF tensor name under `encoder.layers.{i}.`
LAYER_TENSOR_NAMES: dict[str, str] = {
    "ln1_w": "layer_norm1.weight",
    "ln1_b": "layer_norm1.bias",
    "wq": "self_attn.q_proj.weight",
    "bq": "self_attn.q_proj.bias",
    "wk": "self_attn.k_proj.weight",
    "bk": "self_attn.k_proj.bias",
    "wv": "self_attn.v_proj.weight",
    "bv": "self_attn.v_proj.bias",
    "wo": "self_attn.out_proj.weight",
    "bo": "self_attn.out_proj.bias",
    "ln2_w": "layer_norm2.weight",
    "ln2_b": "layer_norm2.bias",
    "fc1_w": "mlp.fc1.weight",
    "fc1_b": "mlp.fc1.bias",
    "fc2_w": "mlp.fc2.weight",
    "fc2_b": "mlp.fc2.bias",
}


def layer_shapes(config: SiglipConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every per-layer field in our layout (linear weights `[in, out]`)."""
    d, f = config.hidden_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {name: (d,) for name in LAYER_TENSOR_NAMES}
    return shapes | {"wq": (d, d), "wk": (d, d), "wv": (d, d), "wo": (d, d),
                     "fc1_w": (d, f), "fc1_b": (f,), "fc2_w": (f, d)}


def build_params(
    config: SiglipConfig, read: Callable[[str], np.ndarray], prefix: str, dtype: jnp.dtype
) -> SiglipParams:
    """Assemble `SiglipParams` from HF tensors named `prefix + "embeddings..."` etc.

    `read(name)` returns one tensor in PyTorch layout; shapes are checked, linear weights
    transposed to `[in, out]` and the patch convolution flattened to a `[C*p*p, D]` matmul.
    """
    c = config
    d, p = c.hidden_size, c.patch_size

    def fetch(name: str, shape: tuple[int, ...]) -> np.ndarray:
        """One tensor; `shape` is the source (PyTorch) layout."""
        array = read(prefix + name)
        if tuple(array.shape) != shape:
            raise ValueError(f"tensor {prefix + name!r} has shape {tuple(array.shape)}, expected {shape}")
        return array

    def field(name: str, shape: tuple[int, ...]) -> jax.Array:
        """A tensor in our layout: 2-D (linear) weights are stored transposed in the source."""
        if len(shape) == 2:
            return jnp.asarray(fetch(name, shape[::-1]).T, dtype)
        return jnp.asarray(fetch(name, shape), dtype)

    shapes = layer_shapes(c)
    layers = tuple(
        SiglipLayerParams(
            **{f: field(f"encoder.layers.{i}.{LAYER_TENSOR_NAMES[f]}", shape) for f, shape in shapes.items()}
        )
        for i in range(c.num_layers)
    )
    kernel = fetch("embeddings.patch_embedding.weight", (d, c.num_channels, p, p))
    return SiglipParams(
        patch_w=jnp.asarray(kernel.reshape(d, -1).T, dtype),
        patch_b=field("embeddings.patch_embedding.bias", (d,)),
        pos=jnp.asarray(fetch("embeddings.position_embedding.weight", (c.grid * c.grid, d)), dtype),
        layers=layers,
        post_ln_w=field("post_layernorm.weight", (d,)),
        post_ln_b=field("post_layernorm.bias", (d,)),
    )


def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis, in float32 (as PyTorch does for float32 inputs)."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype) * weight + bias


def embed_patches(params: SiglipParams, pixel_values: jax.Array, config: SiglipConfig) -> jax.Array:
    """`[B, C, S, S]` pixels -> `[B, grid*grid, D]` patch embeddings plus position embeddings."""
    c = config
    b = pixel_values.shape[0]
    if pixel_values.shape[1:] != (c.num_channels, c.image_size, c.image_size):
        raise ValueError(
            f"pixel_values must have shape [B, {c.num_channels}, {c.image_size}, {c.image_size}], "
            f"got {tuple(pixel_values.shape)}"
        )
    g, p = c.grid, c.patch_size
    # A stride-p "valid" convolution ignores the last `image_size % p` rows and columns
    # (384 px with 14 px patches: 27 patches cover 378 px).
    pixel_values = pixel_values[:, :, : g * p, : g * p]
    patches = pixel_values.reshape(b, c.num_channels, g, p, g, p).transpose(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(b, g * g, c.num_channels * p * p).astype(params.patch_w.dtype)
    return patches @ params.patch_w + params.patch_b + params.pos


def encoder_layer(p: SiglipLayerParams, x: jax.Array, config: SiglipConfig) -> jax.Array:
    """One pre-norm block: bidirectional multi-head attention, then the GELU MLP."""
    c = config
    h = layer_norm(x, p.ln1_w, p.ln1_b, c.layer_norm_eps)
    heads = (*h.shape[:-1], c.num_heads, c.head_dim)
    q = (h @ p.wq + p.bq).reshape(heads)
    k = (h @ p.wk + p.bk).reshape(heads)
    v = (h @ p.wv + p.bv).reshape(heads)
    attn = jax.nn.dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim), no mask
    x = x + attn.reshape(x.shape) @ p.wo + p.bo
    h = layer_norm(x, p.ln2_w, p.ln2_b, c.layer_norm_eps)
    return x + activation(c.hidden_act, "hidden_act")(h @ p.fc1_w + p.fc1_b) @ p.fc2_w + p.fc2_b


def hidden_states(
    params: SiglipParams, pixel_values: jax.Array, *, config: SiglipConfig, num_layers: int | None = None
) -> tuple[jax.Array, ...]:
    """The embeddings and the outputs of the first `num_layers` layers (default all), each `[B, N, D]`.

    Entry `i` is `transformers`' `hidden_states[i]`: no post-layernorm anywhere. Running fewer
    layers skips the ones a feature-layer selection does not need.
    """
    n = config.num_layers if num_layers is None else num_layers
    if not 0 <= n <= config.num_layers:
        raise ValueError(f"num_layers must be in [0, {config.num_layers}], got {n}")
    states = [embed_patches(params, pixel_values, config)]
    for p in params.layers[:n]:
        states.append(encoder_layer(p, states[-1], config))
    return tuple(states)


def forward(params: SiglipParams, pixel_values: jax.Array, *, config: SiglipConfig) -> jax.Array:
    """`SiglipVisionModel`'s `last_hidden_state`: the last layer's output after the post-layernorm."""
    last = hidden_states(params, pixel_values, config=config)[-1]
    return layer_norm(last, params.post_ln_w, params.post_ln_b, config.layer_norm_eps)


def init_random(config: SiglipConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> SiglipParams:
    """Random parameters of the right shapes (benchmarks and tests without a checkpoint):
    normal weights times `scale`, zero biases, unit LayerNorm weights."""
    c = config
    d = c.hidden_size
    keys = iter(jax.random.split(key, 2 + 16 * c.num_layers))
    normal = lambda shape: (scale * jax.random.normal(next(keys), shape)).astype(dtype)

    def field(name: str, shape: tuple[int, ...]) -> jax.Array:
        if name.startswith("ln"):
            return jnp.ones(shape, dtype) if name.endswith("_w") else jnp.zeros(shape, dtype)
        return normal(shape) if len(shape) == 2 else jnp.zeros(shape, dtype)

    shapes = layer_shapes(c)
    return SiglipParams(
        patch_w=normal((c.num_channels * c.patch_size**2, d)),
        patch_b=jnp.zeros((d,), dtype),
        pos=normal((c.grid * c.grid, d)),
        layers=tuple(SiglipLayerParams(**{f: field(f, s) for f, s in shapes.items()}) for _ in range(c.num_layers)),
        post_ln_w=jnp.ones((d,), dtype),
        post_ln_b=jnp.zeros((d,), dtype),
    )
