"""Image and video-frame preprocessing of LLaVA-OneVision, equal to the `transformers` processor's.

Frames: resize to `size` (bicubic, aspect ratio not kept), rescale by 1/255, normalise with the
processor's mean/std. Resizing uses Pillow, exactly as `transformers`' PIL image processor does
(uint8 in, uint8 out), so results equal it bit for bit before the float steps. The torchvision
video processor resizes uint8 frames with PyTorch's antialiased bicubic instead, a port of the
same algorithm: identical when upscaling, and within one uint8 level on under 1% of the pixels
when downscaling (measured on 720p and 480p frames).

Images (`anyres`): the image is also resized (keeping its aspect ratio) and zero-padded to the
best-fitting resolution among `grid_pinpoints`, cut into `size` crops, and the plain resize of
the whole image is prepended as crop 0. Several images in one prompt skip the crops: each is
padded to a square with the mean colour and resized (`anyres=False`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# LLaVA-OneVision's default crop grids: every (rows, columns) of 1..6 crops of 384 px.
DEFAULT_PINPOINTS = tuple((384 * r, 384 * c) for r in range(1, 7) for c in range(1, 7))
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
PROCESSOR_FILE = "processor_config.json"  # transformers >= 5: all sub-processors in one file
LEGACY_FILES = {"video": "video_preprocessor_config.json", "image": "preprocessor_config.json"}


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """Processor settings; the defaults are `transformers`' LlavaOnevision processor class defaults.

    Released checkpoints override them (llava-hf's use mean = std = 0.5): read them with
    `from_dir` rather than relying on the defaults.
    """

    size: tuple[int, int] = (384, 384)  # (height, width)
    resample: int = 3  # a PIL resampling code: 3 bicubic, 2 bilinear
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    grid_pinpoints: tuple[tuple[int, int], ...] = DEFAULT_PINPOINTS

    def __post_init__(self) -> None:
        if self.resample not in PIL_RESAMPLE:
            raise ValueError(f"resample={self.resample} is not a PIL resampling code {PIL_RESAMPLE}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(f"image_mean and image_std need 3 values, got {self.image_mean}, {self.image_std}")

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> PreprocessConfig:
        """From a `transformers` image or video processor config dict."""
        for flag in ("do_resize", "do_rescale", "do_normalize"):
            if cfg.get(flag) is False:
                raise ValueError(f"processor config {flag}=False is not supported")
        if cfg.get("do_center_crop"):
            raise ValueError("processor config do_center_crop=True is not supported")
        size = cfg.get("size", {"height": 384, "width": 384})
        if not {"height", "width"} <= set(size):
            raise ValueError(f"processor config size={size} is not supported: expected height and width")
        pinpoints = cfg.get("image_grid_pinpoints")
        default = cls()
        return cls(
            size=(int(size["height"]), int(size["width"])),
            resample=int(cfg.get("resample", default.resample)),
            rescale_factor=float(cfg.get("rescale_factor", default.rescale_factor)),
            image_mean=tuple(float(x) for x in cfg.get("image_mean", default.image_mean)),
            image_std=tuple(float(x) for x in cfg.get("image_std", default.image_std)),
            grid_pinpoints=tuple((int(h), int(w)) for h, w in pinpoints) if pinpoints else DEFAULT_PINPOINTS,
        )

    @classmethod
    def from_dir(cls, path: str | Path, kind: str = "video") -> PreprocessConfig:
        """The `kind` ("video" or "image") processor settings saved in an HF model directory.

        Reads `processor_config.json` (transformers >= 5) or the older separate files
        (`video_preprocessor_config.json`, `preprocessor_config.json`); a video processor falls
        back to the image processor's settings.
        """
        if kind not in LEGACY_FILES:
            raise ValueError(f"kind must be 'video' or 'image', got {kind!r}")
        directory = Path(path)
        kinds = ("video", "image") if kind == "video" else ("image",)
        combined = directory / PROCESSOR_FILE
        combined_cfg = json.loads(combined.read_text()) if combined.is_file() else {}
        for k in kinds:
            if isinstance(combined_cfg.get(f"{k}_processor"), dict):
                return cls.from_hf_dict(combined_cfg[f"{k}_processor"])
            legacy = directory / LEGACY_FILES[k]
            if legacy.is_file():
                return cls.from_hf_dict(json.loads(legacy.read_text()))
        raise FileNotFoundError(
            f"no {kind} processor config in {directory} (looked for {PROCESSOR_FILE} and "
            f"{', '.join(LEGACY_FILES[k] for k in kinds)})"
        )


def check_image(image: np.ndarray, name: str) -> np.ndarray:
    """`image` as a uint8 `[H, W, 3]` array, or a ValueError naming `name`."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 RGB, got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{name} must have shape [H, W, 3], got {image.shape}")
    return image


def resize(image: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """uint8 `[H, W, 3]` -> uint8 `[h, w, 3]` with Pillow (`size` is `(h, w)`)."""
    if image.shape[:2] == tuple(size):
        return image  # Pillow returns an unchanged copy too
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), resample=resample))


def normalize(images: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """uint8 `[..., H, W, 3]` -> float32 `[..., 3, H, W]`: rescale, then subtract mean, divide by std."""
    x = (images.astype(np.float64) * config.rescale_factor).astype(np.float32)
    x = (x - np.asarray(config.image_mean, np.float32)) / np.asarray(config.image_std, np.float32)
    return np.moveaxis(x, -1, -3)


def preprocess_frames(frames: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Video frames uint8 `[T, H, W, 3]` -> pixel values float32 `[T, 3, h, w]` (the video processor's)."""
    frames = np.asarray(frames)
    if frames.ndim != 4:
        raise ValueError(f"frames must have shape [T, H, W, 3], got {frames.shape}")
    for i, frame in enumerate(frames):
        check_image(frame, f"frames[{i}]")
    return normalize(np.stack([resize(f, config.size, config.resample) for f in frames]), config)


def select_best_resolution(image_size: tuple[int, int], pinpoints: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The `(height, width)` in `pinpoints` that keeps most of the image's pixels, then wastes least.

    Same rule and tie-breaking as `transformers.image_processing_utils.select_best_resolution`.
    """
    height, width = image_size
    best, best_effective, best_wasted = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = h * w - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (h, w), effective, wasted
    return best


def _fit_within(image_size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """Size of the image resized to fit `target` with its aspect ratio (`get_patch_output_size`)."""
    (height, width), (th, tw) = image_size, target
    scale_w, scale_h = tw / width, th / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), th), tw
    return th, min(math.ceil(width * scale_h), tw)


def anyres_crops(image: np.ndarray, config: PreprocessConfig) -> list[np.ndarray]:
    """uint8 `[H, W, 3]` -> the plain resize, then the crops of the padded best-fit resolution."""
    target = select_best_resolution(image.shape[:2], config.grid_pinpoints)
    fitted = resize(image, _fit_within(image.shape[:2], target), config.resample)
    pad_y, pad_x = target[0] - fitted.shape[0], target[1] - fitted.shape[1]
    padded = np.pad(fitted, ((pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2), (0, 0)))
    ch, cw = config.size
    crops = [padded[i : i + ch, j : j + cw] for i in range(0, target[0], ch) for j in range(0, target[1], cw)]
    return [resize(image, config.size, config.resample)] + [resize(c, config.size, config.resample) for c in crops]


def pad_to_square(image: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Centre `image` on a square canvas of the processor's mean colour (`int(mean * 255)`)."""
    height, width = image.shape[:2]
    side = max(height, width)
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = [int(m * 255) for m in config.image_mean]
    top, left = (side - height) // 2, (side - width) // 2
    canvas[top : top + height, left : left + width] = image
    return canvas


def preprocess_image(image: np.ndarray, config: PreprocessConfig, *, anyres: bool = True) -> np.ndarray:
    """One uint8 `[H, W, 3]` image -> pixel values float32 `[P, 3, h, w]`.

    `anyres=True` (a prompt with a single image): P = 1 + the best-fit grid's crops.
    `anyres=False` (one of several images in a prompt): P = 1, padded to a square first.
    """
    image = check_image(image, "image")
    if anyres:
        crops = anyres_crops(image, config)
    else:
        crops = [resize(pad_to_square(image, config), config.size, config.resample)]
    return normalize(np.stack(crops), config)
