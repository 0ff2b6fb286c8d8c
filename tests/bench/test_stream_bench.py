"""bench/stream.py: the committed results agree with their own summary and render, and random
clips update a stream's memory exactly as encoded frames do (what its 0.5b configuration
relies on). The runs themselves take minutes."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from bench import stream
from kvjax import LiveVLM, StreamSession

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
MEMORY_KEYS = ("frames", "stream_tokens", "init_tokens", "long_term_tokens", "short_term_tokens",
               "device_kv_bytes", "host_kv_bytes")


@pytest.mark.parametrize("path", sorted(RESULTS.glob("stream-*.json")), ids=lambda p: p.name)
def test_committed_results_match_their_summary(path, tmp_path):
    data = json.loads(path.read_text())
    assert data["benchmark"] == "stream" and data["environment"]["backend"]
    for row in data["rows"]:
        assert row["summary"] == stream.summarize(row)
        curves = stream.series(row)
        live = [p["device_kv_bytes"] for p in curves["livevlm"]]
        full = [p["device_kv_bytes"] for p in curves["fullvideo"]]
        assert len(set(live)) == 1 and full == sorted(full) and full[-1] > 3 * full[0]
        assert curves["livevlm"][-1]["frames"] == row["summary"]["livevlm_frames_streamed_within_budget"]
        assert {p["frames"] for p in curves[stream.REFERENCE]} == {64}
    lines = sum(len(stream.series(row)["livevlm"]) for row in data["rows"])
    assert len(stream.markdown_table(data["rows"]).splitlines()) == lines + 2
    png = tmp_path / "stream.png"
    stream.plot(data["rows"], png)
    assert png.stat().st_size > 10_000


def test_random_clips_update_memory_like_encoded_frames(tiny_lm):
    method = LiveVLM(memory_tokens=32, short_frames=2, clip_frames=2)
    encoded, random = (StreamSession(tiny_lm, method, frame_tokens=24) for _ in range(2))
    rng = np.random.default_rng(0)
    for i in range(12):  # 576 tokens: the long-term memory is compressed 8 times over
        encoded.add_frames(rng.standard_normal((2, 24, tiny_lm.config.hidden_size)).astype(np.float32))
        stream.advance_random(random, seed=i)
    a, b = encoded.memory_stats(), random.memory_stats()
    assert {k: a[k] for k in MEMORY_KEYS} == {k: b[k] for k in MEMORY_KEYS}
    assert a["long_term_tokens"] == 32 and a["stream_tokens"] == 12 * 48
    np.testing.assert_array_equal(encoded.state.short_frame, random.state.short_frame)
    shapes = lambda s: jax.tree.map(lambda x: (x.shape, x.dtype), s.state)
    assert shapes(encoded) == shapes(random)
