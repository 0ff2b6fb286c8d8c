"""LLaVA-OneVision: SigLIP vision tower, 2-layer GELU projector, Qwen2 decoder (`models.llama`).

Loads `llava-hf/llava-onevision-qwen2-*-ov-hf` format directories (config.json + safetensors)
and reproduces `transformers`' `LlavaOnevisionForConditionalGeneration`:

- vision features: SigLIP hidden state(s) picked by `vision_feature_layer` (-1: the last
  layer's output, *without* the post-layernorm; a list concatenates several), projected to the
  LM width. `vision_feature_select_strategy` must be "full" (SigLIP has no CLS token to drop);
- video frames: features pooled 2x2 with `interpolate(mode="bilinear")` (align_corners=False,
  no antialias) from a g x g patch grid to ceil(g/2) x ceil(g/2) tokens (27x27 -> 14x14 = 196 at
  384 px); `transformers` appends one `image_newline` per video, streaming uses none;
- images: the full anyres packing (crops merged into one grid, padding removed, downscaled when
  larger than `anyres_max_N` crops, a newline token after each row, the base crop first), or a
  single crop plus one newline when the image came as one of several (`anyres=False` crops);
- the prompt: token embeddings with the features written, in order, over the image/video
  placeholder tokens, then the Qwen2 decoder (`llama.forward_embeddings`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax.cache import Cache
from kvjax.methods.base import Method
from models import siglip
from models.config import ModelConfig, read_json_config
from models.llama import forward_embeddings
from models.params import Params
from models.params import init_random as init_random_text
from models.safetensors_loader import build_params as build_text_params
from models.safetensors_loader import tensor_reader
from models.vision_preprocess import DEFAULT_PINPOINTS, select_best_resolution

# `LlavaOnevisionConfig`'s vision tower when config.json has no vision_config (SigLIP-so400m
# with its last layer removed, as released).
DEFAULT_VISION = {"hidden_size": 1152, "intermediate_size": 4304, "patch_size": 14, "image_size": 384,
                  "num_hidden_layers": 26, "num_attention_heads": 16}
# `Qwen2Config` defaults that differ from `ModelConfig.from_hf_dict`'s (released configs omit some).
QWEN2_DEFAULTS = {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768}


@dataclasses.dataclass(frozen=True)
class LlavaOnevisionConfig:
    """The static configuration; hashable, so it can be a static argument of jitted functions."""

    text: ModelConfig
    vision: siglip.SiglipConfig
    image_token_id: int = 151646
    video_token_id: int = 151647
    vision_feature_layers: tuple[int, ...] = (-1,)  # indices into SigLIP's hidden states
    projector_act: str = "gelu"
    projector_bias: bool = True
    grid_pinpoints: tuple[tuple[int, int], ...] = DEFAULT_PINPOINTS  # (height, width) in pixels
    max_crops: int = 9  # the N of vision_aspect_ratio "anyres_max_N"

    def __post_init__(self) -> None:
        siglip.activation(self.projector_act, "projector_hidden_act")
        n = self.vision.num_layers
        for layer in self.vision_feature_layers:
            if not -(n + 1) <= layer <= n:
                raise ValueError(f"vision_feature_layer={layer} is out of range for {n} vision layers")

    @property
    def pooled_grid(self) -> int:
        """Tokens per side of a pooled video frame: ceil(grid / 2) (14 at 384 px)."""
        return math.ceil(self.vision.grid / 2)

    @property
    def tokens_per_frame(self) -> int:
        """LM tokens per video frame (196 at 384 px)."""
        return self.pooled_grid**2

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> LlavaOnevisionConfig:
        """From the contents of an HF `llava_onevision` config.json."""
        if cfg.get("model_type") != "llava_onevision":
            raise ValueError(f"config.json model_type={cfg.get('model_type')!r} is not 'llava_onevision'")
        if "text_config" not in cfg:
            raise ValueError("config.json has no text_config")
        strategy = cfg.get("vision_feature_select_strategy", "full")
        if strategy != "full":
            raise ValueError(
                f"vision_feature_select_strategy={strategy!r} is not supported: SigLIP has no CLS token, "
                "so only 'full' keeps the patch grid intact"
            )
        text_cfg = {"model_type": "qwen2", **cfg["text_config"]}
        if text_cfg["model_type"] == "qwen2":
            text_cfg = {**QWEN2_DEFAULTS, **text_cfg}
        text = ModelConfig.from_hf_dict(text_cfg)
        if cfg.get("tie_word_embeddings") and not text.tie_word_embeddings:
            text = dataclasses.replace(text, tie_word_embeddings=True)
        layers = cfg.get("vision_feature_layer", -1)
        aspect = cfg.get("vision_aspect_ratio", "anyres_max_9")
        match = re.fullmatch(r"anyres_max_(\d+)", aspect)
        if match is None:
            raise ValueError(f"vision_aspect_ratio={aspect!r} is not supported; expected 'anyres_max_N'")
        pinpoints = cfg.get("image_grid_pinpoints")
        return cls(
            text=text,
            vision=siglip.SiglipConfig.from_hf_dict(cfg.get("vision_config") or DEFAULT_VISION),
            image_token_id=int(cfg.get("image_token_index", cls.image_token_id)),
            video_token_id=int(cfg.get("video_token_index", cls.video_token_id)),
            vision_feature_layers=(int(layers),) if isinstance(layers, int) else tuple(int(x) for x in layers),
            projector_act=cfg.get("projector_hidden_act", "gelu"),
            projector_bias=bool(cfg.get("multimodal_projector_bias", True)),
            grid_pinpoints=tuple((int(h), int(w)) for h, w in pinpoints) if pinpoints else DEFAULT_PINPOINTS,
            max_crops=int(match.group(1)),
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> LlavaOnevisionConfig:
        return cls.from_hf_dict(read_json_config(path))


@struct.dataclass
class LlavaOnevisionParams:
    vision: siglip.SiglipParams
    proj1_w: jax.Array  # [Dv * len(vision_feature_layers), D]
    proj2_w: jax.Array  # [D, D]
    image_newline: jax.Array  # [D]
    text: Params
    proj1_b: jax.Array | None = None  # [D] (multimodal_projector_bias)
    proj2_b: jax.Array | None = None


# Tensor-name layouts: llava-hf releases and transformers' save_pretrained write the first of
# each; transformers 4.5x wrote the `model.`-prefixed ones.
LM_PREFIXES = ("language_model.model.", "model.language_model.")
LM_HEADS = ("language_model.lm_head.weight", "lm_head.weight")
VISION_PREFIXES = ("vision_tower.vision_model.", "vision_tower.", "model.vision_tower.vision_model.",
                   "model.vision_tower.")
PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")
NEWLINES = ("image_newline", "model.image_newline")


def _find(names: set[str], candidates: tuple[str, ...], suffix: str, directory: Path) -> str:
    """The first candidate (prefix) whose `candidate + suffix` tensor the checkpoint holds."""
    for candidate in candidates:
        if candidate + suffix in names:
            return candidate
    raise ValueError(f"{directory}: none of {[c + suffix for c in candidates]} is in the checkpoint")


def load_llava_onevision(
    path: str | Path, dtype: jnp.dtype = jnp.float32
) -> tuple[LlavaOnevisionConfig, LlavaOnevisionParams]:
    """Load an HF LLaVA-OneVision directory (config.json + safetensors, sharded or not).

    Errors name the file and tensor: FileNotFoundError for a missing directory/config/shard,
    ValueError for unsupported settings, missing tensors and wrong shapes.
    """
    directory = Path(path)
    with tensor_reader(directory) as (names, read):
        config = LlavaOnevisionConfig.from_json_file(directory / "config.json")
        lm = _find(names, LM_PREFIXES, "embed_tokens.weight", directory)
        lm_head = next((n for n in LM_HEADS if n in names), None)
        if lm_head is None and not config.text.tie_word_embeddings:
            config = dataclasses.replace(config, text=dataclasses.replace(config.text, tie_word_embeddings=True))

        def read_text(name: str) -> np.ndarray:
            # build_text_params asks for a plain causal LM's names: model.* and lm_head.weight
            return read(lm_head if name == "lm_head.weight" else lm + name.removeprefix("model."))

        text = build_text_params(config.text, read_text, dtype, source=str(directory))
        vision = siglip.build_params(
            config.vision, read, _find(names, VISION_PREFIXES, "embeddings.patch_embedding.weight", directory), dtype
        )
        proj = _find(names, PROJECTOR_PREFIXES, "linear_1.weight", directory)
        d_in = config.vision.hidden_size * len(config.vision_feature_layers)
        d = config.text.hidden_size

        def fetch(name: str, shape: tuple[int, ...]) -> jax.Array:
            array = read(name)
            if tuple(array.shape) != shape:
                raise ValueError(f"{directory}: tensor {name!r} has shape {tuple(array.shape)}, expected {shape}")
            return jnp.asarray(array.T if array.ndim == 2 else array, dtype)

        bias = config.projector_bias
        params = LlavaOnevisionParams(
            vision=vision,
            proj1_w=fetch(proj + "linear_1.weight", (d, d_in)),
            proj2_w=fetch(proj + "linear_2.weight", (d, d)),
            image_newline=fetch(_find(names, NEWLINES, "", directory), (d,)),
            text=text,
            proj1_b=fetch(proj + "linear_1.bias", (d,)) if bias else None,
            proj2_b=fetch(proj + "linear_2.bias", (d,)) if bias else None,
        )
    return config, params


def vision_features(
    params: LlavaOnevisionParams, pixel_values: jax.Array, *, config: LlavaOnevisionConfig
) -> jax.Array:
    """Pixels `[B, 3, S, S]` -> projected patch features `[B, grid*grid, D]` (before any pooling)."""
    n = config.vision.num_layers
    indices = [layer % (n + 1) for layer in config.vision_feature_layers]
    states = siglip.hidden_states(params.vision, pixel_values, config=config.vision, num_layers=max(indices))
    x = jnp.concatenate([states[i] for i in indices], axis=-1)
    act = siglip.activation(config.projector_act, "projector_hidden_act")
    x = x @ params.proj1_w
    if params.proj1_b is not None:
        x = x + params.proj1_b
    x = act(x) @ params.proj2_w
    return x if params.proj2_b is None else x + params.proj2_b


def bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    """`[n_out, n_in]` weights of PyTorch's bilinear resize (align_corners=False, no antialias).

    Source coordinate `(i + 0.5) * n_in / n_out - 0.5`, clamped at 0, in float32 as PyTorch
    computes it; the upper neighbour is clamped to the last input.
    """
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), 0)
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (src - lo).astype(np.float32)
    weights = np.zeros((n_out, n_in), np.float32)
    rows = np.arange(n_out)
    np.add.at(weights, (rows, lo), 1 - frac)
    np.add.at(weights, (rows, hi), frac)
    return weights


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
    """`[..., H, W, D]` -> `[..., height, width, D]`, as `F.interpolate(mode="bilinear")`."""
    wh = jnp.asarray(bilinear_weights(x.shape[-3], height))
    ww = jnp.asarray(bilinear_weights(x.shape[-2], width))
    return jnp.einsum("oh,...hwd,pw->...opd", wh, x, ww).astype(x.dtype)


def video_features(
    params: LlavaOnevisionParams, pixel_values: jax.Array, *, config: LlavaOnevisionConfig, newline: bool = False
) -> jax.Array:
    """Frames `[T, 3, S, S]` -> `[T * tokens_per_frame (+1), D]`: projected, 2x2 bilinear pooled.

    `newline=True` appends the `image_newline` token after the last frame, as `transformers`
    does for each video in a prompt; a stream of frames has none.
    """
    g, pg = config.vision.grid, config.pooled_grid
    x = vision_features(params, pixel_values, config=config)
    x = resize_bilinear(x.reshape(x.shape[0], g, g, -1), pg, pg).reshape(-1, x.shape[-1])
    return jnp.concatenate([x, params.image_newline[None].astype(x.dtype)]) if newline else x


def unpad(grid: jax.Array, image_size: tuple[int, int]) -> jax.Array:
    """Crop the padding that anyres preprocessing added around an image `[H, W, D]` (`unpad_image`)."""
    (height, width), (rows, cols) = image_size, grid.shape[:2]
    if width / height > cols / rows:
        padding = (rows - int(round(height * (cols / width), 7))) // 2
        return grid[padding : rows - padding]
    padding = (cols - int(round(width * (rows / height), 7))) // 2
    return grid[:, padding : cols - padding]


def image_features(
    params: LlavaOnevisionParams,
    pixel_values: jax.Array,
    image_size: tuple[int, int],
    *,
    config: LlavaOnevisionConfig,
) -> jax.Array:
    """One image's crops `[P, 3, S, S]` -> its LM tokens `[N, D]`.

    `image_size` is the original `(height, width)`. P > 1 (anyres crops from
    `preprocess_image(anyres=True)`): the base crop's tokens, then the merged crop grid with
    its padding removed, downscaled if it exceeds `max_crops` crops' worth, and a newline token
    after each row. P == 1: the crop's tokens and one newline.
    """
    image_size = (int(image_size[0]), int(image_size[1]))
    crops, s = pixel_values.shape[0], config.vision.image_size
    best = select_best_resolution(image_size, config.grid_pinpoints)
    rows, cols = best[0] // s, best[1] // s
    if crops not in (1, rows * cols + 1):
        raise ValueError(
            f"pixel_values has {crops} crops, but an image of (height, width) {image_size} is cut "
            f"into {rows}x{cols} crops plus the base image ({rows * cols + 1}), or is 1 crop"
        )
    x = vision_features(params, pixel_values, config=config)
    newline = params.image_newline.astype(x.dtype)
    if crops == 1:
        return jnp.concatenate([x[0], newline[None]])
    g, d = config.vision.grid, x.shape[-1]
    grid = x[1:].reshape(rows, cols, g, g, d).transpose(0, 2, 1, 3, 4).reshape(rows * g, cols * g, d)
    grid = unpad(grid, image_size)
    height, width = grid.shape[:2]
    ratio = math.sqrt(height * width / (config.max_crops * g * g))
    if ratio > 1.1:
        grid = resize_bilinear(grid, int(height // ratio), int(width // ratio))
    grid = jnp.concatenate([grid, jnp.broadcast_to(newline, (grid.shape[0], 1, d))], axis=1)
    return jnp.concatenate([x[0], grid.reshape(-1, d)])


def embed(
    params: LlavaOnevisionParams,
    tokens: jax.Array,
    *,
    config: LlavaOnevisionConfig,
    image_features: jax.Array | None = None,
    video_features: jax.Array | None = None,
) -> jax.Array:
    """Token embeddings `[B, T, D]` with feature rows written over the placeholder tokens.

    Rows of `image_features` / `video_features` `[N, D]` fill the image / video placeholders
    in order (batch row by batch row, left to right), as `masked_scatter` does. Outside `jit`
    the placeholder count is checked against N.
    """
    x = params.text.embed[tokens]
    for name, token_id, features in (("image_features", config.image_token_id, image_features),
                                     ("video_features", config.video_token_id, video_features)):
        if features is None:
            continue
        mask = tokens == token_id
        if not isinstance(tokens, jax.core.Tracer):
            count = int(np.sum(np.asarray(mask)))
            if count != features.shape[0]:
                raise ValueError(
                    f"{name} has {features.shape[0]} rows but tokens hold {count} placeholders (id {token_id})"
                )
        index = jnp.clip(jnp.cumsum(mask.reshape(-1)) - 1, 0, features.shape[0] - 1).reshape(mask.shape)
        x = jnp.where(mask[..., None], features[index].astype(x.dtype), x)
    return x


def forward(
    params: LlavaOnevisionParams,
    tokens: jax.Array,
    positions: jax.Array,
    cache: Cache,
    method: Method,
    *,
    config: LlavaOnevisionConfig,
    image_features: jax.Array | None = None,
    video_features: jax.Array | None = None,
    last_only: bool = False,
) -> tuple[jax.Array, Cache]:
    """`models.llama.forward` for a multimodal prompt: `(logits, new_cache)`.

    `tokens` hold image/video placeholder ids where `image_features` / `video_features`
    (from `image_features()` / `video_features()`) go; positions, cache, method and
    `last_only` are as in `llama.forward`.
    """
    x = embed(params, tokens, config=config, image_features=image_features, video_features=video_features)
    return forward_embeddings(params.text, x, positions, cache, method, config=config.text, last_only=last_only)


def init_random(config: LlavaOnevisionConfig, key: jax.Array, dtype=jnp.float32,
                scale: float = 0.02) -> LlavaOnevisionParams:
    """Random parameters of the right shapes (benchmarks and tests without a checkpoint)."""
    k_vision, k_text, k1, k2, k_newline = jax.random.split(key, 5)
    d = config.text.hidden_size
    d_in = config.vision.hidden_size * len(config.vision_feature_layers)
    normal = lambda k, shape: (scale * jax.random.normal(k, shape)).astype(dtype)
    bias = (lambda: jnp.zeros((d,), dtype)) if config.projector_bias else (lambda: None)
    return LlavaOnevisionParams(
        vision=siglip.init_random(config.vision, k_vision, dtype, scale),
        proj1_w=normal(k1, (d_in, d)), proj2_w=normal(k2, (d, d)), image_newline=normal(k_newline, (d,)),
        text=init_random_text(config.text, k_text, dtype, scale), proj1_b=bias(), proj2_b=bias(),
    )
