"""Orbax save/restore of converted `Params`, and the on-disk cache layout used by `models.load`.

Converting a checkpoint (dequantizing GGUF blocks, transposing, casting) is slow; restoring the
result with Orbax is fast. Cache entries live under `$KVJAX_CACHE_DIR` (default `~/.cache/kvjax`)
in a directory keyed by the source's path, size and mtime and the target dtype, so editing or
replacing the source, or asking for another dtype, makes a new entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from models.config import ModelConfig, RopeScaling
from models.params import LayerParams, Params, param_shapes

CACHE_ENV_VAR = "KVJAX_CACHE_DIR"
CONFIG_FILE = "config.json"
CHECKSUM_FILE = "checksums.json"
# Bump when the layout of `Params` or of a cache entry changes, so old entries are not reused.
CACHE_FORMAT_VERSION = 2


def cache_root() -> Path:
    """`$KVJAX_CACHE_DIR` if set, else `~/.cache/kvjax`."""
    root = os.environ.get(CACHE_ENV_VAR)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "kvjax"


def cache_dir_for(source: str | Path, dtype: jnp.dtype) -> Path:
    """Cache entry directory for `source` (a file, or an HF checkpoint directory) at `dtype`.

    The key hashes the resolved path with the size and mtime of the file (of each file directly
    inside, for a directory), the dtype and `CACHE_FORMAT_VERSION`.
    """
    source = Path(source).resolve()
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file())
    else:
        files = [source]
    parts = [str(source), jnp.dtype(dtype).name, str(CACHE_FORMAT_VERSION)]
    for f in files:
        st = f.stat()
        parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return cache_root() / f"{source.stem or source.name}-{jnp.dtype(dtype).name}-{digest}"


def abstract_params(config: ModelConfig, dtype: jnp.dtype) -> Params:
    """`Params` of `jax.ShapeDtypeStruct`s: the restore target for `config` at `dtype`."""

    def spec(*shape: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))

    layer = LayerParams(**{name: spec(*shape) for name, shape in param_shapes(config).items()})
    v, d = config.vocab_size, config.hidden_size
    return Params(
        embed=spec(v, d),
        layers=(layer,) * config.num_layers,
        final_norm=spec(d),
        lm_head=None if config.tie_word_embeddings else spec(d, v),
    )


def params_checksums(params: Params) -> list[int]:
    """One integer per leaf: the sum of its raw bits, so any flipped bit changes it.

    Orbax/TensorStore store no checksum of array bytes; without this a corrupted byte inside
    a chunk would restore silently wrong weights.
    """
    sums = []
    for leaf in jax.tree_util.tree_leaves(params):
        array = np.ascontiguousarray(np.asarray(leaf))
        bits = array.view(np.dtype(f"uint{array.dtype.itemsize * 8}"))
        sums.append(int(bits.sum(dtype=np.uint64)))
    return sums


def save_params(params: Params, directory: str | Path) -> None:
    """Write `params` as an Orbax checkpoint at `directory` (replacing any existing one),
    with per-leaf checksums beside it."""
    directory = Path(directory).absolute()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory, params, force=True)
    (directory / CHECKSUM_FILE).write_text(json.dumps(params_checksums(params)))


def restore_params(directory: str | Path, config: ModelConfig, dtype: jnp.dtype) -> Params:
    """Read back `save_params`' checkpoint of the model described by `config`, as `dtype`.

    Raises ValueError if the restored arrays do not match the checksums written with them.
    """
    directory = Path(directory).absolute()
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(directory, abstract_params(config, dtype))
    expected = json.loads((directory / CHECKSUM_FILE).read_text())
    if params_checksums(params) != expected:
        raise ValueError(f"{directory}: restored params do not match their checksums (corrupt checkpoint)")
    return params


def save_config(config: ModelConfig, directory: str | Path) -> None:
    """Write `config` as `directory/config.json` (our field names, not HF's)."""
    Path(directory, CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(config), indent=1))


def restore_config(directory: str | Path) -> ModelConfig:
    """Read back `save_config`'s file."""
    fields = json.loads(Path(directory, CONFIG_FILE).read_text())
    if fields["rope_scaling"] is not None:
        fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
    fields["eos_token_ids"] = tuple(fields["eos_token_ids"])
    return ModelConfig(**fields)
