"""`bench/clusterkv_offload.py` on a small random model (the real run takes minutes)."""

from __future__ import annotations

import jax

from bench import clusterkv_offload
from bench.method_speed import IdTokenizer
from kvjax import ClusterKV
from models.bundle import Model
from models.config import ModelConfig
from models.params import init_random


def small_model() -> Model:
    config = ModelConfig(architecture="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                         num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
                         max_position_embeddings=1024, tie_word_embeddings=True)
    return Model(config=config, params=init_random(config, jax.random.key(1), scale=0.3),
                 tokenizer=IdTokenizer(), name="small")


def test_whole_selection_bytes_counts_every_recall_head_and_sparse_layer():
    config = small_model().config
    # query heads 4, sparse layers 4 - 1, K and V rows of 16 float32 values
    assert clusterkv_offload.whole_selection_bytes(ClusterKV(budget=80, sink=16, dense_layers=1), config, 4) == (
        64 * 2 * 16 * 4 * 4 * 3)
    assert clusterkv_offload.whole_selection_bytes(
        ClusterKV(budget=80, sink=16, selection="kv_head"), config, 2) == 64 * 2 * 16 * 2 * 2 * 2


def test_measure_offload_matches_on_device_and_copies_less_than_the_selection():
    model = small_model()
    tokens = jax.random.randint(jax.random.key(2), (700,), 0, 512).tolist()
    row = clusterkv_offload.measure(model, tokens, budget=96, new_tokens=12)
    assert row["tokens_agreeing"] == row["tokens_generated"] == 12
    assert 0.0 < row["cluster_hit_rate"] <= 1.0
    # Reuse between steps: on average less than the whole selection is copied, but not nothing
    # (the first step after the prefill copies all of it).
    assert 0.0 < row["copied_share"] < 1.0
    assert row["device_kv_bytes"]["offload"] < row["device_kv_bytes"]["on_device"]
    assert row["host_kv_bytes"] > 0
    table = clusterkv_offload.markdown_table([{"text": "random", "context": 700, **row}])
    assert f"| {row['cluster_hit_rate']:.3f} |" in table
