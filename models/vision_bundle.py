"""LLaVA-OneVision as a streaming model: the Qwen2 decoder bundle plus a frame encoder.

A `kvjax.StreamSession` runs the text decoder of a `Model` and feeds pixel frames through
`model.encode_frames`, taking `model.tokens_per_frame` as the most tokens per frame.
`VisionLanguageModel` is that bundle for LLaVA-OneVision: frames are preprocessed as the
`transformers` video processor does (resize, rescale, normalise; `models.vision_preprocess`),
encoded by SigLIP and the projector and pooled 2x2 (196 tokens per frame at 384 px), with no
newline token (a stream has none: ALGORITHMS.md section 5). On a device mesh
(`kvjax.sharding.shard_model`) the frames of a batch split over its `data` axis.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models import llava_onevision as llava
from models.bundle import Model
from models.vision_preprocess import PreprocessConfig, preprocess_frames

ENCODE_BATCH = 8  # frames per vision-tower call; shorter batches are padded to a power of two


@functools.partial(jax.jit, static_argnames=("config", "mesh"))
def _video_features(params: llava.LlavaOnevisionParams, pixels: jax.Array, *, config: llava.LlavaOnevisionConfig,
                    mesh: Mesh | None) -> jax.Array:
    """`llava.video_features` of a batch of frames; on a `mesh`, replicated: every device (and
    process) gets the features whole, as the stream's host-side clip assembly reads them."""
    x = llava.video_features(params, pixels, config=config)
    return x if mesh is None else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec()))


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisionLanguageModel(Model):
    """A `Model` (the text decoder: `config`, `params`, `tokenizer`) with LLaVA-OneVision's vision path."""

    llava_config: llava.LlavaOnevisionConfig
    llava_params: llava.LlavaOnevisionParams  # its `text` is `params`
    preprocess: PreprocessConfig
    # Places a padded batch of preprocessed frames `[B, 3, S, S]` (a host array) for the vision
    # tower. None: the default device. `kvjax.sharding.shard_model` sets it on a mesh, and the
    # features come back replicated on the mesh of the placed frames.
    place_pixels: Callable[[np.ndarray], jax.Array] | None = None

    def __post_init__(self) -> None:
        size = self.llava_config.vision.image_size
        if self.preprocess.size != (size, size):
            raise ValueError(f"the video processor resizes to {self.preprocess.size}, but the vision tower "
                             f"takes {size}x{size} images")

    @property
    def tokens_per_frame(self) -> int:
        return self.llava_config.tokens_per_frame

    def encode_frames(self, frames: np.ndarray) -> jax.Array:
        """uint8 frames `[T, H, W, 3]` -> per-frame token embeddings `[T, tokens_per_frame, hidden]`."""
        pixels = preprocess_frames(frames, self.preprocess)
        out = []
        for i in range(0, len(pixels), ENCODE_BATCH):
            chunk = pixels[i : i + ENCODE_BATCH]
            padded = np.zeros((1 << (len(chunk) - 1).bit_length(), *chunk.shape[1:]), chunk.dtype)
            padded[: len(chunk)] = chunk
            batch = jnp.asarray(padded) if self.place_pixels is None else self.place_pixels(padded)
            mesh = batch.sharding.mesh if isinstance(batch.sharding, NamedSharding) else None
            features = _video_features(self.llava_params, batch, config=self.llava_config, mesh=mesh)
            out.append(features.reshape(len(padded), self.tokens_per_frame, -1)[: len(chunk)])
        return jnp.concatenate(out)


def is_llava_onevision(path: str | Path) -> bool:
    """Whether `path` is a directory whose config.json declares `model_type: llava_onevision`."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "llava_onevision"
    except (OSError, ValueError):
        return False


def load_vision_model(path: str | Path, dtype: jnp.dtype = jnp.float32) -> VisionLanguageModel:
    """Load an HF LLaVA-OneVision directory: weights, video processor settings and tokenizer.

    FileNotFoundError names what is missing (the directory, config.json, a shard, the
    processor config); ValueError an unsupported setting or a tensor of the wrong shape.
    """
    from models.loading import dir_tokenizer  # models.loading dispatches here

    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory not found: {directory}")
    config, params = llava.load_llava_onevision(directory, dtype)
    return VisionLanguageModel(
        config=config.text, params=params.text, tokenizer=dir_tokenizer(directory), name=directory.name,
        llava_config=config, llava_params=params, preprocess=PreprocessConfig.from_dir(directory, "video"),
    )
