"""Tiny random `transformers` models saved with `save_pretrained`, for parity tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

COMMON = dict(
    vocab_size=211,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)

CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON, rope_theta=10000.0),
    "llama3_scaled": lambda: LlamaConfig(
        **COMMON,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
        },
    ),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**COMMON, tie_word_embeddings=False),
    "qwen2_tied": lambda: Qwen2Config(**COMMON, tie_word_embeddings=True),
}
CLASSES = {"llama": LlamaForCausalLM, "llama3_scaled": LlamaForCausalLM, "mistral": MistralForCausalLM,
           "qwen2": Qwen2ForCausalLM, "qwen2_tied": Qwen2ForCausalLM}


def save_tiny(kind: str, directory: Path, seed: int = 0) -> torch.nn.Module:
    """Create a random tiny model of `kind`, save it to `directory`, return it (eval mode)."""
    torch.manual_seed(seed)
    model = CLASSES[kind](CONFIGS[kind]()).eval()
    with torch.no_grad():  # random non-trivial norms and biases so every parameter matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model
