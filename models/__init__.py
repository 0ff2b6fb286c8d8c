"""Functional Flax decoders and their weight loaders."""

from models.bundle import Model
from models.config import ModelConfig
from models.llama import forward
from models.params import Params, init_random


def load(name_or_path, dtype=None, cache: bool = True) -> Model:
    """Load a model bundle: "smollm2" (embedded), a `.gguf` file or a local HF directory."""
    from models.loading import load as _load

    return _load(name_or_path, dtype=dtype, cache=cache) if dtype is not None else _load(name_or_path, cache=cache)


__all__ = ["Model", "ModelConfig", "Params", "forward", "init_random", "load"]
