"""Load a llama.cpp GGUF file (llama / qwen2 architectures) into `ModelConfig` + `Params`.

Tensors are dequantized to float32 with `gguf.quants.dequantize` (F32, F16, BF16, Q4_0, Q4_1,
Q5_0, Q5_1, Q8_0, the K-quants, ... whatever that function supports), renamed to their HF names
and handed to `build_params`, which validates, transposes and casts them.

Two GGUF quirks are handled here:
* `ReaderTensor.shape` is in ggml order (fastest axis first), the reverse of numpy's; the
  dequantized array is reshaped to the reversed shape, i.e. PyTorch's `[out, in]`.
* `convert_hf_to_gguf.py` permutes the rows of Q and K (weights and biases) of *llama*-architecture
  models from HF rotate-half order to llama.cpp's interleaved-pair order; `_unpermute` undoes it.
  Qwen2 files are written without that permutation.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize

from models.config import SUPPORTED_ARCHITECTURES, ModelConfig, RopeScaling
from models.params import Params
from models.safetensors_loader import (
    EMBED_NAME,
    FINAL_NORM_NAME,
    LAYER_TENSOR_NAMES,
    LM_HEAD_NAME,
    build_params,
    layer_tensor_name,
)

# LayerParams field -> GGUF tensor name suffix under `blk.{i}.`
GGUF_LAYER_NAMES: dict[str, str] = {
    "attn_norm": "attn_norm.weight",
    "wq": "attn_q.weight",
    "wk": "attn_k.weight",
    "wv": "attn_v.weight",
    "wo": "attn_output.weight",
    "mlp_norm": "ffn_norm.weight",
    "w_gate": "ffn_gate.weight",
    "w_up": "ffn_up.weight",
    "w_down": "ffn_down.weight",
    "bq": "attn_q.bias",
    "bk": "attn_k.bias",
    "bv": "attn_v.bias",
}
GGUF_GLOBAL_NAMES: dict[str, str] = {
    EMBED_NAME: "token_embd.weight",
    FINAL_NORM_NAME: "output_norm.weight",
    LM_HEAD_NAME: "output.weight",
}
ROPE_FREQS_NAME = "rope_freqs.weight"
# Llama 3.1 defaults that convert_hf_to_gguf.py also assumes when it writes `rope_freqs`.
_LLAMA3_LOW_FREQ_FACTOR = 1.0
_LLAMA3_HIGH_FREQ_FACTOR = 4.0
_LLAMA3_ORIGINAL_CONTEXT = 8192


def _open_reader(path: Path) -> GGUFReader:
    """A GGUFReader, with missing/corrupt files reported as errors that name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return GGUFReader(path)
    except (ValueError, OSError, IndexError) as e:
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from e


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K row permutation (weights `[rows, cols]` or biases `[rows]`).

    convert_hf_to_gguf.py does
    `w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)`, which maps
    HF row `(head, half, j)` to GGUF row `(head, j, half)`; swapping the same two axes back
    restores HF's rotate-half order.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(tensor: ReaderTensor) -> np.ndarray:
    """float32 values of `tensor` in numpy order (PyTorch `[out, in]` for linear weights)."""
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return dequantize(tensor.data, tensor.tensor_type).reshape(shape)


def _llama3_rope_scaling(freqs: np.ndarray, rope_theta: float, head_dim: int, path: Path) -> RopeScaling:
    """Recover Llama 3.1 `RopeScaling` from llama.cpp's per-frequency `rope_freqs` divisors.

    llama.cpp stores the factors rather than the parameters. The converter derives them with the
    standard low/high frequency factors and original context, so we rebuild the factors from
    those and `factor = max(freqs)`, and refuse files whose factors came from anything else.
    """
    scaling = RopeScaling(
        factor=float(freqs.max()),
        low_freq_factor=_LLAMA3_LOW_FREQ_FACTOR,
        high_freq_factor=_LLAMA3_HIGH_FREQ_FACTOR,
        original_max_position_embeddings=_LLAMA3_ORIGINAL_CONTEXT,
    )
    inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    ctx = scaling.original_max_position_embeddings
    smooth = (ctx / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    expected = np.where(
        wavelen < ctx / scaling.high_freq_factor,
        1.0,
        np.where(
            wavelen > ctx / scaling.low_freq_factor,
            scaling.factor,
            1.0 / ((1 - smooth) / scaling.factor + smooth),
        ),
    )
    if freqs.shape != expected.shape or not np.allclose(freqs, expected, rtol=1e-4):
        raise ValueError(
            f"{path}: {ROPE_FREQS_NAME} does not match Llama 3 rope scaling with "
            f"low_freq_factor={scaling.low_freq_factor}, high_freq_factor={scaling.high_freq_factor}, "
            f"original_max_position_embeddings={ctx}; this rope scaling is not supported"
        )
    return scaling


def _config_from_reader(reader: GGUFReader, path: Path) -> ModelConfig:
    """Build `ModelConfig` from GGUF metadata (`{arch}.*` and `tokenizer.ggml.*` keys)."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; expected one of "
            f"{SUPPORTED_ARCHITECTURES}"
        )
    tensors = {t.name: t for t in reader.tensors}

    def required(key: str) -> Any:
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise ValueError(f"{path}: GGUF metadata key {arch}.{key!r} is missing")
        return value

    num_heads = int(required("attention.head_count"))
    hidden = int(required("embedding_length"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // num_heads))
    rope_theta = float(_field(reader, f"{arch}.rope.freq_base", 10000.0))

    scaling_type = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling_type != "none":
        raise ValueError(f"{path}: rope scaling type {scaling_type!r} is not supported")
    rope_scaling = None
    if ROPE_FREQS_NAME in tensors:
        freqs = _dequantize(tensors[ROPE_FREQS_NAME])
        rope_scaling = _llama3_rope_scaling(freqs, rope_theta, head_dim, path)

    if "token_embd.weight" in tensors:
        vocab_size = int(tensors["token_embd.weight"].shape[-1])
    else:
        vocab_size = len(_field(reader, "tokenizer.ggml.tokens", []))
    eos_ids = tuple(
        dict.fromkeys(
            int(i)
            for i in (
                _field(reader, "tokenizer.ggml.eos_token_id"),
                _field(reader, "tokenizer.ggml.eot_token_id"),
            )
            if i is not None
        )
    )
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    return ModelConfig(
        architecture=arch,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(required("feed_forward_length")),
        num_layers=int(required("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 4096)),
        attention_bias="blk.0.attn_q.bias" in tensors,
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=eos_ids,
    )


def read_gguf_config(path: str | Path) -> ModelConfig:
    """The `ModelConfig` of a GGUF file, from its metadata only."""
    path = Path(path)
    return _config_from_reader(_open_reader(path), path)


def load_gguf(path: str | Path, dtype: jnp.dtype = jnp.float32) -> tuple[ModelConfig, Params]:
    """Load a llama / qwen2 GGUF file as `(config, params)`, dequantized and cast to `dtype`.

    Raises FileNotFoundError if the file is missing and ValueError (naming the file and tensor)
    for a non-GGUF file, unsupported metadata, missing tensors or wrong shapes.
    """
    path = Path(path)
    reader = _open_reader(path)
    config = _config_from_reader(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    gguf_names = dict(GGUF_GLOBAL_NAMES)
    for i in range(config.num_layers):
        for field in LAYER_TENSOR_NAMES:
            gguf_names[layer_tensor_name(field, i)] = f"blk.{i}.{GGUF_LAYER_NAMES[field]}"
    permuted_heads = {}
    if config.architecture == "llama":
        permuted_heads = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads}

    def read(hf_name: str) -> np.ndarray:
        name = gguf_names[hf_name]
        tensor = tensors.get(name)
        if tensor is None:
            raise ValueError(f"{path}: tensor {name!r} ({hf_name}) is missing from the GGUF file")
        try:
            array = _dequantize(tensor)
        except (NotImplementedError, ValueError) as e:
            raise ValueError(
                f"{path}: cannot dequantize tensor {name!r} of type {tensor.tensor_type.name}: {e}"
            ) from e
        kind = name.split(".")[-2]  # attn_q in blk.{i}.attn_q.{weight|bias}
        if kind in permuted_heads:
            array = _unpermute(array, permuted_heads[kind])
        return array

    return config, build_params(config, read, dtype, source=str(path))


def load_gguf_tokenizer(path: str | Path) -> Any:
    """The `transformers` tokenizer embedded in a GGUF file, with its chat template set.

    Raises ValueError if the file carries no tokenizer (`tokenizer.ggml.model` metadata).
    """
    from transformers import AutoTokenizer

    path = Path(path)
    reader = _open_reader(path)
    if reader.get_field("tokenizer.ggml.model") is None:
        raise ValueError(f"{path}: GGUF file has no tokenizer metadata (tokenizer.ggml.model)")
    tokenizer = AutoTokenizer.from_pretrained(
        str(path.parent), gguf_file=path.name, local_files_only=True
    )
    if tokenizer.chat_template is None:
        tokenizer.chat_template = _field(reader, "tokenizer.chat_template")
    return tokenizer
