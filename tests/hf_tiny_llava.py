"""A tiny random `LlavaOnevisionForConditionalGeneration` saved with `save_pretrained`.

SigLIP at 30 px with 4 px patches: a 7x7 patch grid (odd, like the real 27x27; 30 is no multiple
of 4, as 384 is none of 14), pooled to 4x4 = 16 tokens per video frame. Crop grids are
multiples of 30 px. Token ids 209/210 are the image and video placeholders of a 211-token Qwen2
vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import LlavaOnevisionForConditionalGeneration


IMAGE_SIZE = 30
PINPOINTS = [[30, 30], [30, 60], [60, 30], [60, 60], [60, 90], [90, 60], [90, 90]]
VISION = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=4, vision_use_head=False)
TEXT = dict(model_type="qwen2", vocab_size=211, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            tie_word_embeddings=False)
IMAGE_TOKEN, VIDEO_TOKEN = 209, 210


def save_tiny_llava(
    directory: Path, seed: int = 0, vision_config: dict[str, Any] | None = None,
    text_config: dict[str, Any] | None = None, **overrides: Any,
) -> LlavaOnevisionForConditionalGeneration:
    """Create a random tiny LLaVA-OneVision, save it (float32) to `directory`, return it in eval mode.

    `vision_config` / `text_config` entries replace those of `VISION` / `TEXT`; `overrides` go
    to `LlavaOnevisionConfig` (e.g. `vision_feature_layer`, `vision_aspect_ratio`). Norm weights
    and all biases are randomised so that every parameter affects the output.
    """
    import torch  # here: the config constants above import without torch
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    config = LlavaOnevisionConfig(vision_config=VISION | (vision_config or {}), text_config=TEXT | (text_config or {}),
                                  image_token_index=IMAGE_TOKEN, video_token_index=VIDEO_TOKEN,
                                  image_grid_pinpoints=PINPOINTS, **overrides)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


def save_streaming_llava(directory: Path, tokenizer: Any) -> None:
    """A tiny LLaVA-OneVision directory that `kvjax stream` can load: the model with `tokenizer`'s
    vocabulary (49152 for SmolLM2's) and larger text weights (initializer_range 0.3: peaked
    next-token distributions, so greedy tokens do not flip on float rounding), the tokenizer,
    and a video processor config (30 px, mean = std = 0.5 as in llava-hf's releases)."""
    save_tiny_llava(directory, text_config={"vocab_size": len(tokenizer), "initializer_range": 0.3})
    tokenizer.save_pretrained(str(directory))
    processor = {"size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "resample": 3, "image_mean": [0.5] * 3,
                 "image_std": [0.5] * 3, "rescale_factor": 1 / 255}
    (directory / "video_preprocessor_config.json").write_text(json.dumps(processor))
