"""Sharded vs single-device LLaVA-OneVision vision path, run as a script with 8 CPU devices.

`tests/kvjax/test_sharding.py` runs `python -m tests.kvjax.mesh_vision` (as it runs
`mesh_parity`) and checks the JSON it prints. The model is `tests/hf_tiny_llava.py`'s tiny
LLaVA-OneVision shape with random weights and byte tokens. For each mesh and on one device:
where `shard_model` put the vision parameters, where a batch of frames is placed, the
features of `encode_frames` for a batch that splits over `data` (3 frames, padded to 4) and
one that does not (1 frame), the collectives of a compiled vision batch, and a LiveVLM
stream of pixel frames with one question.

Meshes: `data=2,model=2` (4 devices), where SigLIP's 2 heads, its 48-unit MLP and the 64-unit
projector split; `data=2,model=4` (8 devices), where the heads replicate and the MLPs split.
"""

from __future__ import annotations

from tests.kvjax.mesh_parity import ByteTokenizer, layout, mesh_axes  # first: it starts jax with 8 CPU devices

import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from kvjax import LiveVLM, StreamSession  # noqa: E402
from kvjax.sharding import make_mesh, shard_model  # noqa: E402
from models import llava_onevision as llava  # noqa: E402
from models.vision_bundle import VisionLanguageModel, _video_features  # noqa: E402
from models.vision_preprocess import PreprocessConfig  # noqa: E402
from tests.hf_tiny_llava import IMAGE_SIZE, TEXT, VISION  # noqa: E402

MESHES = {"data=2,model=2": 4, "data=2,model=4": 8}  # spec -> devices used
LIVE = LiveVLM(memory_tokens=32, short_frames=2, clip_frames=2, score_queries=8)
FRAMES, NEW = 6, 8
COLLECTIVE_OP = re.compile(r" (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)(?:-start)?\(")
RESULT_SHAPE = re.compile(r"\w+\[([\d,]*)\]")  # in an HLO line before its op: the result's shapes


def tiny_vlm() -> VisionLanguageModel:
    """The tiny LLaVA-OneVision with random weights (scaled up: peaked next-token
    distributions) and a byte vocabulary."""
    config = llava.LlavaOnevisionConfig.from_hf_dict(
        {"model_type": "llava_onevision", "vision_config": VISION, "text_config": TEXT | {"vocab_size": 258}})
    params = llava.init_random(config, jax.random.key(0), scale=0.3)
    preprocess = PreprocessConfig(size=(IMAGE_SIZE, IMAGE_SIZE), image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    return VisionLanguageModel(config=config.text, params=params.text, tokenizer=ByteTokenizer(), name="tiny-vlm",
                               llava_config=config, llava_params=params, preprocess=preprocess)


def weight_moves(model: VisionLanguageModel, mesh) -> list[str]:
    """Collectives in the compiled vision batch (4 frames) that could move parameters: any
    but an all-reduce or all-gather, or one whose result has a vision or projector
    parameter's shape. The tower must run on the weight shards: its collectives are the
    all-reduces after the row-parallel matmuls and the gather of the features."""
    shapes = {tuple(x.shape) for x in jax.tree_util.tree_leaves(model.llava_params.replace(text=None))}
    pixels = model.place_pixels(np.zeros((4, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32))
    hlo = _video_features.lower(model.llava_params, pixels, config=model.llava_config, mesh=mesh).compile().as_text()
    moves = []
    for line in hlo.splitlines():
        op = COLLECTIVE_OP.search(line)
        if op is None:
            continue
        results = {tuple(int(d) for d in dims.split(",") if d) for dims in RESULT_SHAPE.findall(line[:op.start()])}
        if op.group(1) not in ("all-reduce", "all-gather") or results & shapes:
            moves.append(line.strip()[:200])
    return moves


def random_frames() -> np.ndarray:
    """`FRAMES` random RGB frames [T, H, W, 3] uint8."""
    return np.random.default_rng(0).integers(0, 256, (FRAMES, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)


def stream_answer(model: VisionLanguageModel, frames: np.ndarray, mesh):
    """A LiveVLM stream of `frames` (vision batches of 1 and 5, padded to 8), then a question."""
    session = StreamSession(model, LIVE, mesh=mesh)  # places the parameters itself
    session.add_frames(frames[:1])
    session.add_frames(frames[1:])
    return session.ask("What came first?", max_new_tokens=NEW)


def run(model: VisionLanguageModel, frames: np.ndarray, mesh) -> dict:
    """Frame features and a stream's answer; on a mesh, where the parameters and frames went."""
    answer = stream_answer(model, frames, mesh)
    sharded = model if mesh is None else shard_model(model, mesh)
    encoded = {n: sharded.encode_frames(frames[:n]) for n in (1, 3)}
    result = {"encoded": {n: np.asarray(x).tolist() for n, x in encoded.items()},
              "tokens": answer.tokens, "logits": answer.logits.tolist()}
    if mesh is not None:
        pixels = np.zeros((1, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32)
        result |= {
            "params": layout(sharded.llava_params),
            "text_is_params": all(a is b for a, b in zip(jax.tree_util.tree_leaves(sharded.llava_params.text),
                                                         jax.tree_util.tree_leaves(sharded.params))),
            "frames_layout": {n: mesh_axes(sharded.place_pixels(pixels.repeat(n, 0))) for n in (1, 4)},
            "encoded_layout": {n: mesh_axes(x) for n, x in encoded.items()},
            "weight_moves": weight_moves(sharded, mesh),
        }
    return result


def main() -> None:
    model = tiny_vlm()
    frames = random_frames()
    results = {"single": run(model, frames, None)}
    for spec, devices in MESHES.items():
        results[spec] = run(model, frames, make_mesh(spec, jax.devices()[:devices]))
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
