"""Load a Hugging Face Llama / Mistral / Qwen2 checkpoint directory into `Params`.

The directory holds `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json`. Tensors are read one at a time (memory-mapped), checked against
`param_shapes`, transposed from PyTorch's `[out, in]` to our `[in, out]` and cast to `dtype`.

`build_params` is shared with the GGUF loader: both present their tensors under HF names in
PyTorch layout, so naming, validation and transposition live in one place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm
from safetensors import SafetensorError, safe_open

from models.config import ModelConfig
from models.params import LayerParams, Params, param_shapes

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# LayerParams field -> HF tensor name suffix under `model.layers.{i}.`
LAYER_TENSOR_NAMES: dict[str, str] = {
    "attn_norm": "input_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "w_gate": "mlp.gate_proj.weight",
    "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
    "bq": "self_attn.q_proj.bias",
    "bk": "self_attn.k_proj.bias",
    "bv": "self_attn.v_proj.bias",
}
EMBED_NAME = "model.embed_tokens.weight"
FINAL_NORM_NAME = "model.norm.weight"
LM_HEAD_NAME = "lm_head.weight"


def layer_tensor_name(field: str, layer: int) -> str:
    """HF name of `LayerParams.<field>` in layer `layer`."""
    return f"model.layers.{layer}.{LAYER_TENSOR_NAMES[field]}"


def build_params(
    config: ModelConfig,
    read: Callable[[str], np.ndarray],
    dtype: jnp.dtype,
    source: str,
) -> Params:
    """Assemble `Params` from tensors in HF naming and PyTorch `[out, in]` layout.

    `read(name)` returns one tensor (raising a clear error if it is absent). Every tensor is
    shape-checked, 2-D ones are transposed to `[in, out]`, and each is converted to a JAX array
    right away so at most one source tensor is materialized in host memory at a time.
    """

    def fetch(name: str, shape: tuple[int, ...], transpose: bool) -> jnp.ndarray:
        # `shape` is our layout; the source holds its transpose for 2-D linear weights.
        expected = shape[::-1] if transpose else shape
        array = read(name)
        if tuple(array.shape) != expected:
            raise ValueError(
                f"{source}: tensor {name!r} has shape {tuple(array.shape)}, expected {expected}"
            )
        return jnp.asarray(array.T if transpose else array, dtype=dtype)

    shapes = param_shapes(config)
    progress = tqdm(range(config.num_layers), desc=f"converting {Path(source).name}", unit="layer",
                    leave=False, disable=None)  # disable=None: only on a terminal
    layers = tuple(
        LayerParams(
            **{
                field: fetch(layer_tensor_name(field, i), shape, transpose=len(shape) == 2)
                for field, shape in shapes.items()
            }
        )
        for i in progress
    )
    vocab, hidden = config.vocab_size, config.hidden_size
    return Params(
        embed=fetch(EMBED_NAME, (vocab, hidden), transpose=False),
        layers=layers,
        final_norm=fetch(FINAL_NORM_NAME, (hidden,), transpose=False),
        lm_head=None
        if config.tie_word_embeddings
        else fetch(LM_HEAD_NAME, (hidden, vocab), transpose=True),
    )


def _weight_files(directory: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file that holds it (reading headers only)."""
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index_path} is not a valid safetensors index: {e!r}") from e
        files = {name: directory / fname for name, fname in weight_map.items()}
        for path in set(files.values()):
            if not path.is_file():
                raise FileNotFoundError(f"shard {path} listed in {index_path} does not exist")
        return files
    single = directory / SINGLE_FILE
    if not single.is_file():
        raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}")
    with _open(single) as f:
        return {name: single for name in f.keys()}


def _open(path: Path):
    """`safe_open` with corrupt/truncated files reported as a ValueError naming the file."""
    try:
        return safe_open(str(path), framework="numpy")
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e


def _check_directory(path: str | Path) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    return directory


def _config_for(directory: Path, tensor_names: set[str]) -> ModelConfig:
    """`config.json`, with embeddings marked tied when the checkpoint has no `lm_head.weight`."""
    config = ModelConfig.from_json_file(directory / "config.json")
    if not config.tie_word_embeddings and LM_HEAD_NAME not in tensor_names:
        config = dataclasses.replace(config, tie_word_embeddings=True)
    return config


def read_safetensors_config(path: str | Path) -> ModelConfig:
    """The `ModelConfig` that `load_safetensors_dir` would return, without reading any weights."""
    directory = _check_directory(path)
    return _config_for(directory, set(_weight_files(directory)))


@contextlib.contextmanager
def tensor_reader(path: str | Path) -> Iterator[tuple[set[str], Callable[[str], np.ndarray]]]:
    """Open a (sharded) safetensors directory: yields `(tensor names, read)`.

    `read(name)` memory-maps one tensor as numpy; a missing tensor or an unreadable file raises
    a ValueError naming the directory or file. Shards are opened on first use and closed on exit.
    """
    directory = _check_directory(path)
    files = _weight_files(directory)
    with contextlib.ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def read(name: str) -> np.ndarray:
            file = files.get(name)
            if file is None:
                raise ValueError(f"{directory}: tensor {name!r} is missing from the checkpoint")
            if file not in handles:
                handles[file] = stack.enter_context(_open(file))
            try:
                return handles[file].get_tensor(name)
            except SafetensorError as e:
                raise ValueError(f"{file}: cannot read tensor {name!r}: {e}") from e

        yield set(files), read


def load_safetensors_dir(
    path: str | Path, dtype: jnp.dtype = jnp.float32
) -> tuple[ModelConfig, Params]:
    """Load an HF Llama / Mistral / Qwen2 checkpoint directory as `(config, params)`.

    Embeddings are tied (`lm_head=None`) when `config.json` says so or `lm_head.weight` is absent.
    Raises FileNotFoundError for a missing directory, config or shard and ValueError for corrupt
    files, missing tensors and wrong shapes; every message names the file and tensor concerned.
    """
    with tensor_reader(path) as (names, read):
        directory = Path(path)
        config = _config_for(directory, names)
        params = build_params(config, read, dtype, source=str(directory))
    return config, params
