"""LLaVA-OneVision (SigLIP + projector + Qwen2) vs `transformers` on a tiny random checkpoint,
and the image/frame preprocessing vs the `transformers` image processor on decoded video frames."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import LlavaOnevisionImageProcessorPil

from kvjax import CacheSpec, Full, init_cache
from models import llava_onevision as llava
from models import siglip
from models.vision_preprocess import PreprocessConfig, preprocess_frames, preprocess_image
from tests.hf_tiny_llava import IMAGE_SIZE, IMAGE_TOKEN, PINPOINTS, VIDEO_TOKEN, save_tiny_llava

TOL = 1e-4
forward = jax.jit(llava.forward, static_argnames=("method", "config", "last_only"))
video_features = jax.jit(llava.video_features, static_argnames=("config", "newline"))
image_features = jax.jit(llava.image_features, static_argnames=("image_size", "config"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(directory, HF model, our config, our params). `anyres_max_1` makes multi-crop images
    larger than one crop's worth of tokens, so their features are bilinearly downscaled."""
    directory = tmp_path_factory.mktemp("llava")
    hf_model = save_tiny_llava(directory, vision_aspect_ratio="anyres_max_1")
    config, params = llava.load_llava_onevision(directory)
    return directory, hf_model, config, params


@pytest.fixture(scope="module")
def tiny_processor():
    return LlavaOnevisionImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                           image_grid_pinpoints=PINPOINTS, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def _text(rng, n):
    return rng.integers(0, IMAGE_TOKEN, n).tolist()  # ids below the placeholders


def _our_logits(config, params, tokens, **features):
    spec = CacheSpec(batch=1, capacity=len(tokens) + 8, num_layers=config.text.num_layers,
                     num_heads=config.text.num_heads, num_kv_heads=config.text.num_kv_heads,
                     head_dim=config.text.head_dim)
    logits, _ = forward(params, jnp.asarray([tokens]), jnp.arange(len(tokens))[None], init_cache(Full(), spec),
                        Full(), config=config, **features)
    return np.asarray(logits[0])


def _hf_logits(hf_model, tokens, **inputs):
    with torch.no_grad():
        return hf_model(input_ids=torch.tensor([tokens]), **inputs).logits[0].numpy()


def test_config_and_siglip_tower(tiny):
    """Config fields; the SigLIP tower (with its post-layernorm) equals `SiglipVisionModel`."""
    _, hf_model, config, params = tiny
    assert config.vision.grid == 7 and config.pooled_grid == 4 and config.tokens_per_frame == 16
    assert (config.image_token_id, config.video_token_id, config.max_crops) == (IMAGE_TOKEN, VIDEO_TOKEN, 1)
    assert config.vision_feature_layers == (-1,) and config.text.architecture == "qwen2"
    pixels = np.random.default_rng(0).standard_normal((2, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    with torch.no_grad():
        expected = hf_model.model.vision_tower(torch.from_numpy(pixels)).last_hidden_state.numpy()
    ours = jax.jit(siglip.forward, static_argnames="config")(params.vision, jnp.asarray(pixels), config=config.vision)
    np.testing.assert_allclose(np.asarray(ours), expected, atol=TOL, rtol=0)


def test_video_features_and_logits(tiny):
    """A 5-frame video: pooled features (7x7 -> 4x4 per frame, + newline) and the logits."""
    _, hf_model, config, params = tiny
    rng = np.random.default_rng(1)
    frames = rng.standard_normal((5, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    with torch.no_grad():
        expected = hf_model.model.get_video_features(torch.from_numpy(frames)[None]).pooler_output[0].numpy()
    feats = video_features(params, jnp.asarray(frames), config=config, newline=True)
    assert feats.shape == (5 * 16 + 1, config.text.hidden_size)
    np.testing.assert_allclose(np.asarray(feats), expected, atol=TOL, rtol=0)
    streamed = video_features(params, jnp.asarray(frames), config=config)  # no newline when streaming
    np.testing.assert_array_equal(np.asarray(streamed), np.asarray(feats[:-1]))

    tokens = _text(rng, 6) + [VIDEO_TOKEN] * feats.shape[0] + _text(rng, 7)
    np.testing.assert_allclose(_our_logits(config, params, tokens, video_features=feats),
                               _hf_logits(hf_model, tokens, pixel_values_videos=torch.from_numpy(frames)[None]),
                               atol=TOL, rtol=0)


@pytest.mark.parametrize("size", [(40, 70), (20, 24)], ids=["2x3-crops-unpad-downscale", "1x1-crop"])
def test_anyres_image_and_video_logits(tiny, tiny_processor, size):
    """One anyres image (base crop + grid, unpadded, downscaled when large) and a 2-frame video
    in one prompt."""
    _, hf_model, config, params = tiny
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    processed = tiny_processor(images=image, return_tensors="np")
    pixels = preprocess_image(image, PreprocessConfig.from_hf_dict(tiny_processor.to_dict()))
    np.testing.assert_array_equal(pixels, processed["pixel_values"][0])
    img = image_features(params, jnp.asarray(pixels), size, config=config)
    video = rng.standard_normal((2, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    vid = video_features(params, jnp.asarray(video), config=config, newline=True)
    tokens = _text(rng, 4) + [IMAGE_TOKEN] * img.shape[0] + _text(rng, 3) + [VIDEO_TOKEN] * vid.shape[0] + [5]
    expected = _hf_logits(hf_model, tokens, pixel_values=torch.from_numpy(pixels)[None],
                          image_sizes=torch.tensor([size]), pixel_values_videos=torch.from_numpy(video)[None])
    np.testing.assert_allclose(_our_logits(config, params, tokens, image_features=img, video_features=vid),
                               expected, atol=TOL, rtol=0)


def test_multi_image_prompt_logits(tiny, tiny_processor):
    """Two images in one prompt: each padded to a square, one crop and one newline each."""
    _, hf_model, config, params = tiny
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((30, 50), (45, 20))]
    processed = tiny_processor(images=[images], return_tensors="np")
    pre = PreprocessConfig.from_hf_dict(tiny_processor.to_dict())
    pixels = [preprocess_image(im, pre, anyres=False) for im in images]
    np.testing.assert_array_equal(np.stack(pixels), processed["pixel_values"])
    feats = jnp.concatenate([image_features(params, jnp.asarray(p), im.shape[:2], config=config)
                             for p, im in zip(pixels, images)])
    assert feats.shape[0] == 2 * (49 + 1)
    tokens = _text(rng, 3) + [IMAGE_TOKEN] * 50 + _text(rng, 2) + [IMAGE_TOKEN] * 50 + _text(rng, 4)
    expected = _hf_logits(hf_model, tokens, pixel_values=torch.from_numpy(processed["pixel_values"]),
                          image_sizes=torch.tensor([im.shape[:2] for im in images]), batch_num_images=[2])
    np.testing.assert_allclose(_our_logits(config, params, tokens, image_features=feats), expected, atol=TOL, rtol=0)


def test_feature_layer_list_and_older_tensor_layout(tmp_path):
    """`vision_feature_layer=[-2, -1]` concatenates two hidden states; tensors named as
    transformers 4.5x saved them (`model.`-prefixed, `vision_model.` inside the tower) load too."""
    hf_model = save_tiny_llava(tmp_path, seed=1, vision_feature_layer=[-2, -1])
    tensors = load_file(tmp_path / "model.safetensors")
    renamed = {}
    for name, array in tensors.items():
        if name.startswith("language_model.lm_head"):
            name = name.replace("language_model.lm_head", "lm_head")
        elif name.startswith("language_model.model."):
            name = "model.language_model." + name.removeprefix("language_model.model.")
        elif name.startswith("vision_tower."):
            name = "model.vision_tower.vision_model." + name.removeprefix("vision_tower.")
        else:
            name = "model." + name
        renamed[name] = array
    save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config, params = llava.load_llava_onevision(tmp_path)
    assert config.vision_feature_layers == (-2, -1) and params.proj1_w.shape == (64, 64)
    frames = np.random.default_rng(4).standard_normal((2, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    with torch.no_grad():
        expected = hf_model.model.get_video_features(torch.from_numpy(frames)[None]).pooler_output[0].numpy()
    ours = video_features(params, jnp.asarray(frames), config=config, newline=True)
    np.testing.assert_allclose(np.asarray(ours), expected, atol=TOL, rtol=0)


def test_real_frame_geometry_384px(tmp_path):
    """384 px frames with 14 px patches (27x27, the last 6 pixel rows/columns unused) pool to
    14x14 = 196 tokens, as in `transformers`."""
    hf_model = save_tiny_llava(tmp_path, vision_config={"image_size": 384, "patch_size": 14})
    config, params = llava.load_llava_onevision(tmp_path)
    assert config.vision.grid == 27 and config.tokens_per_frame == 196
    frames = np.random.default_rng(5).standard_normal((2, 3, 384, 384)).astype(np.float32)
    with torch.no_grad():
        expected = hf_model.model.get_video_features(torch.from_numpy(frames)[None]).pooler_output[0].numpy()
    ours = video_features(params, jnp.asarray(frames), config=config, newline=True)
    assert ours.shape == (2 * 196 + 1, config.text.hidden_size)
    np.testing.assert_allclose(np.asarray(ours), expected, atol=TOL, rtol=0)


def test_errors_name_the_problem(tiny, tmp_path):
    directory, _, config, params = tiny
    tokens = jnp.asarray([[1, VIDEO_TOKEN, VIDEO_TOKEN, 2]])
    with pytest.raises(ValueError, match="video_features has 3 rows but tokens hold 2 placeholders"):
        llava.embed(params, tokens, config=config, video_features=jnp.zeros((3, config.text.hidden_size)))
    pixels = jnp.zeros((3, 3, IMAGE_SIZE, IMAGE_SIZE))
    with pytest.raises(ValueError, match=r"pixel_values has 3 crops.*\(7\)"):
        llava.image_features(params, pixels, (40, 70), config=config)
    with pytest.raises(ValueError, match=r"pixel_values must have shape \[B, 3, 30, 30\]"):
        llava.video_features(params, jnp.zeros((1, 3, 32, 32)), config=config)
    cfg = json.loads((directory / "config.json").read_text())
    with pytest.raises(ValueError, match="vision_feature_select_strategy='default' is not supported"):
        llava.LlavaOnevisionConfig.from_hf_dict({**cfg, "vision_feature_select_strategy": "default"})
    with pytest.raises(ValueError, match="model_type='qwen2' is not 'llava_onevision'"):
        llava.LlavaOnevisionConfig.from_hf_dict(cfg["text_config"])
    tensors = load_file(directory / "model.safetensors")
    del tensors["multi_modal_projector.linear_2.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'multi_modal_projector.linear_2.weight' is missing"):
        llava.load_llava_onevision(tmp_path)


def test_frame_preprocessing_matches_processor_on_decoded_video(tmp_path):
    """Frames decoded from an H.264 file, preprocessed at the real 384 px with llava-hf's
    mean = std = 0.5: equal to the `transformers` processor's (the plain resize is its crop 0)."""
    pytest.importorskip("av", reason="PyAV (`av`) is needed to encode and decode the test video")
    from kvjax.video import read_video
    from tests.synthetic_video import write_video

    write_video(tmp_path / "shapes.mp4", fps=4, height=96, width=128)
    frames, _ = read_video(tmp_path / "shapes.mp4", fps=1.0)
    processor = LlavaOnevisionImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor.save_pretrained(tmp_path)
    pre = PreprocessConfig.from_dir(tmp_path)  # no video config: the image processor's settings
    assert pre == PreprocessConfig.from_hf_dict(processor.to_dict())
    assert pre.size == (384, 384) and pre.image_mean == (0.5, 0.5, 0.5) and pre.resample == 3
    ours = preprocess_frames(frames, pre)
    assert ours.shape == (len(frames), 3, 384, 384) and ours.dtype == np.float32
    for frame, pixels in zip(frames, ours):
        expected = processor(images=frame, return_tensors="np")["pixel_values"][0]
        np.testing.assert_allclose(pixels, expected[0], atol=1e-6, rtol=0)
        np.testing.assert_allclose(preprocess_image(frame, pre), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"frames\[0\] must be uint8"):
        preprocess_frames(frames.astype(np.float32), pre)
    with pytest.raises(FileNotFoundError, match="no video processor config"):
        PreprocessConfig.from_dir(tmp_path / "missing")
