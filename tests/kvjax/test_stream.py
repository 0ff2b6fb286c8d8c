"""`StreamSession` with `LiveVLM`, `FullVideo` and `ReKV` (ALGORITHMS.md section 5).

Tiny random model (the `tiny_lm` fixture: 2 layers, 512 trained positions, the SmolLM2
tokenizer): exactness against `FullVideo`, bounded device memory, discarded question KV, one
compile per shape, clear errors. VSB, KeyDiff and PaR against literal numpy references. Two
real-model tests: SmolLM2 caption streams with one early fact.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import FullVideo, LiveVLM, ReKV, StreamingLLM, StreamSession, generate
from kvjax.generation import COMPILE_COUNTS
from kvjax.methods import Full
from kvjax.methods.livevlm import key_distinctness, par_pages, vsb_keep
from kvjax.methods.stream_memory import Moved, StreamLayout
from kvjax.eval.stream_tasks import ANSWER_PREFIX, QUESTION as FACT_QUESTION, caption_stream, lines_for_tokens
from kvjax.stream import default_templates
from kvjax.stream_forward import Executor, question
from kvjax.video import read_video
from models import llava_onevision as llava
from models.vision_bundle import VisionLanguageModel
from models.vision_preprocess import preprocess_frames

FRAME_TOKENS = 24
SMALL = dict(short_frames=2, clip_frames=2)  # fits the tiny model's 512 positions
# Tests share these configurations (and question shapes): each compiles once per session.
LIVE = LiveVLM(memory_tokens=32, **SMALL)
FULL = FullVideo(**SMALL)
VIDEO_FPS = 2.0  # the 10 fps test video sampled to 8 frames
QUESTION, NEW = "Who crossed the square?", 4


def captions(n: int, seed: int) -> list[str]:
    """`n` caption frames without a fact ("Minute 17: a jogger passed the bridge.")."""
    return caption_stream(n, seed).lines


def session(model, method, lines: list[str]) -> StreamSession:
    s = StreamSession(model, method, frame_tokens=FRAME_TOKENS)
    for line in lines:
        s.add_text(line)
    return s


# --- Vision Sink Bucketing and Position-agnostic Retrieval against numpy ------------------------


def vsb_reference(scores: np.ndarray, n: int, m: int, sink_fraction: float, bucket_size: int) -> np.ndarray:
    """The two-phase walk of ALGORITHMS.md section 5 item 4, one token at a time."""
    keep = np.zeros(len(scores), bool)
    if n <= m:
        keep[:n] = True
        return keep
    order = np.argsort(-scores[:n], kind="stable")
    sink = int(sink_fraction * m)
    keep[order[:sink]] = True
    buckets = m // bucket_size
    bucket = np.arange(n) * buckets // n
    used = np.bincount(bucket[order[:sink]], minlength=buckets)
    kept = sink
    for j in order[sink:]:
        if kept == m:
            break
        if used[bucket[j]] < bucket_size:
            keep[j] = True
            used[bucket[j]] += 1
            kept += 1
    return keep


@pytest.mark.parametrize("n,m,sink_fraction,bucket_size", [
    (200, 64, 0.25, 1), (97, 64, 0.25, 1), (64, 64, 0.25, 1), (40, 64, 0.25, 1),
    (300, 60, 0.5, 4), (150, 32, 0.0, 2), (150, 32, 1.0, 1),
])
def test_vsb_matches_two_phase_walk(n, m, sink_fraction, bucket_size):
    rng = np.random.default_rng(n + m)
    scores = rng.random(320).astype(np.float32)
    scores[rng.choice(n, 10)] = scores[0]  # ties: the lower index wins in both
    vsb = jax.jit(vsb_keep, static_argnums=(2, 3, 4))  # one compile instead of one per eager op
    keep = np.asarray(vsb(jnp.asarray(scores), jnp.int32(n), m, int(sink_fraction * m), bucket_size))
    ref = vsb_reference(scores, n, m, sink_fraction, bucket_size)
    np.testing.assert_array_equal(keep, ref)
    assert keep.sum() == min(n, m) and not keep[n:].any()


def par_reference(keys: np.ndarray, n: int, query: np.ndarray, page: int, ratio: float) -> np.ndarray:
    """Pages of mean pre-RoPE keys, scored by the mean query, top ceil(ratio * pages)."""
    hkv, _, d = keys.shape
    pages = math.ceil(n / page)
    page_keys = np.stack([keys[:, p * page: min(n, (p + 1) * page)].mean(axis=1) for p in range(pages)], axis=1)
    scores = np.einsum("hd,hpd->p", query, page_keys) / (hkv * np.sqrt(d))
    chosen = np.argsort(-scores, kind="stable")[: math.ceil(ratio * pages - 1e-6)]
    keep = np.zeros(keys.shape[1], bool)
    for p in chosen:
        keep[p * page: min(n, (p + 1) * page)] = True
    return keep


@pytest.mark.parametrize("n,ratio", [(160, 0.4), (150, 0.4), (7, 0.4), (33, 1.0), (160, 0.1)])
def test_par_selects_top_pages(n, ratio):
    rng = np.random.default_rng(n)
    keys = rng.standard_normal((2, 160, 8)).astype(np.float32)
    query = rng.standard_normal((2, 8)).astype(np.float32)
    par = jax.jit(par_pages, static_argnums=(3, 4))
    pages = np.asarray(par(jnp.asarray(keys), jnp.int32(n), jnp.asarray(query), 16, ratio))
    np.testing.assert_array_equal(np.repeat(pages, 16) & (np.arange(160) < n), par_reference(keys, n, query, 16, ratio))


def test_key_distinctness_is_minus_the_cosine_to_the_mean_unit_key():
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((2, 40, 8)).astype(np.float32)
    unit = keys / np.linalg.norm(keys, axis=-1, keepdims=True)
    anchor = unit[:, :30].mean(axis=1)
    anchor /= np.linalg.norm(anchor, axis=-1, keepdims=True)
    expected = -np.einsum("hcd,hd->c", unit, anchor) / 2
    got = np.asarray(jax.jit(key_distinctness)(jnp.asarray(keys), jnp.int32(30)))
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("vsb_score,kept", [("attention", False), ("keydiff", True)])
def test_keydiff_keeps_a_distinct_token_that_later_clips_do_not_attend(vsb_score, kept):
    """Token 1's key points away from the others' and later clips pay it no attention. When VSB
    must evict, the spec's attention score drops it (token 0 wins their bucket); KeyDiff keeps it."""
    layout = StreamLayout(num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4, init_tokens=4, frame_tokens=4,
                          max_position=4096)
    method = LiveVLM(memory_tokens=8, page_size=4, short_frames=1, clip_frames=1, vsb_score=vsb_score)
    state = method.init_state(layout)
    layer, state = state.layers[0], state.replace(layers=())
    rng = np.random.default_rng(0)
    keys = np.array([1.0, 0.0, 0.0, 0.0]) + 0.1 * rng.standard_normal((12, 4))  # alike
    keys[1] = [0.0, 0.0, 1.0, 0.0]
    values = np.arange(12.0)[:, None].repeat(4, axis=1)  # token i's value holds i
    for clip in range(3):  # 4 tokens move each clip: 12 > M = 8 after the third
        part = slice(4 * clip, 4 * clip + 4)
        moved = Moved(k=jnp.asarray(keys[None, part], jnp.float32), v=jnp.asarray(values[None, part], jnp.float32),
                      valid=jnp.ones(4, bool), frame=jnp.full(4, clip), scores=jnp.full(4, 0.3))
        latest = jnp.where(jnp.arange(layer.long_k.shape[1]) == 1, 0.0, 0.2)  # this clip's attention on long-term slots
        layer = method.store(layout, layer, state, moved, latest if method.needs_scores else None)
        state = method.update_index(layout, state, moved.valid, moved.frame)
    kept_tokens = np.asarray(layer.long_v[0, : int(state.long_len), 0])
    assert len(kept_tokens) == 8 and (1 in kept_tokens) == kept, kept_tokens


# --- sessions on the tiny model -------------------------------------------------------------


@pytest.mark.parametrize("vsb_score", ["attention", "keydiff"])
def test_livevlm_covering_everything_equals_full_video(tiny_lm, vsb_score):
    """M above the stream and retrieve_ratio=1: the same tokens at the same positions."""
    lines = captions(16, seed=1)
    full = session(tiny_lm, FULL, lines).ask(QUESTION, max_new_tokens=NEW)
    live = session(tiny_lm, LiveVLM(memory_tokens=320, retrieve_ratio=1.0, vsb_score=vsb_score, **SMALL),
                   lines).ask(QUESTION, max_new_tokens=NEW)
    np.testing.assert_allclose(live.logits, full.logits, atol=1e-4, rtol=0)
    assert live.tokens == full.tokens and len(live.tokens) == NEW
    assert live.stats["attended_memory_tokens"] == full.stats["attended_memory_tokens"]


def test_device_memory_bounded_while_full_video_grows(tiny_lm):
    """Frames holding 10x more tokens than M: LiveVLM's device bytes stay fixed (init + M +
    short-term), FullVideo's grow with the stream, ReKV's K/V go to host memory."""
    m = LIVE.memory_tokens
    lines = captions(24, seed=2)
    methods = [LIVE, FULL, ReKV(retrieve_frames=4, **SMALL)]
    sessions = [StreamSession(tiny_lm, method, frame_tokens=FRAME_TOKENS) for method in methods]
    sizes = {method.name: [] for method in methods}
    for i, line in enumerate(lines):
        for s in sessions:
            s.add_text(line)
            if i in (3, len(lines) - 1):
                sizes[s.method.name].append(s.memory_stats())
    live, full, rekv = (sizes[m.name] for m in methods)
    assert live[-1]["stream_tokens"] > 10 * m and live[-1]["long_term_tokens"] == m
    assert live[0]["device_kv_bytes"] == live[-1]["device_kv_bytes"]
    assert full[-1]["long_term_tokens"] == full[-1]["stream_tokens"] - full[-1]["short_term_tokens"]
    per_token = 2 * 2 * 2 * 16 * 4  # layers * (K, V) * KV heads * head dim * float32
    assert full[-1]["device_kv_bytes"] > full[0]["device_kv_bytes"]
    assert full[-1]["device_kv_bytes"] >= per_token * full[-1]["long_term_tokens"] > live[-1]["device_kv_bytes"]
    assert rekv[-1]["host_kv_bytes"] > rekv[0]["host_kv_bytes"] > 0
    assert rekv[-1]["device_kv_bytes"] < full[-1]["device_kv_bytes"]
    answers = [s.ask(QUESTION, max_new_tokens=NEW) for s in sessions]
    ft, short = FRAME_TOKENS, SMALL["short_frames"] * FRAME_TOKENS
    assert answers[2].stats["attended_memory_tokens"] <= 32 + 4 * ft + short  # ReKV: 4 frames back
    assert answers[0].stats["attended_memory_tokens"] < answers[1].stats["attended_memory_tokens"]


def test_question_kv_is_discarded_and_shapes_compile_once(tiny_lm):
    lines = captions(12, seed=3)
    s = session(tiny_lm, LIVE, lines)
    before = s.memory_stats()
    first = s.ask(QUESTION, max_new_tokens=NEW)
    counts = COMPILE_COUNTS.copy()
    second = s.ask(QUESTION, max_new_tokens=NEW)
    assert s.memory_stats() == before
    assert second.tokens == first.tokens
    np.testing.assert_array_equal(second.logits, first.logits)
    assert second.stats["ttft_s"] > 0 and second.stats["compile_s"] == 0
    for line in captions(4, seed=4):  # more clips of the same bucket: nothing compiles
        s.add_text(line)
    s.ask(QUESTION, max_new_tokens=NEW)
    assert COMPILE_COUNTS == counts


@dataclasses.dataclass(frozen=True)
class KeySignRetrieval(FullVideo):
    """Retrieves the long-term tokens whose first key coordinate is positive: a different number
    in each layer, whatever the question."""

    name = "key_sign"

    def retrieve(self, layout, layer, state, q, q_valid):
        keep = (jnp.arange(layer.long_k.shape[1]) < state.long_len) & (layer.long_k[0, :, 0] > 0)
        source = jnp.argsort(~keep, stable=True)
        return layer.long_k[:, source], layer.long_v[:, source], jnp.arange(keep.shape[0]) < keep.sum()


def test_answer_decode_when_layers_retrieve_different_counts(tiny_lm):
    """Each generated token equals the greedy choice of a question pass fed the question and
    the tokens before it (teacher forcing), although layers attend different memory sizes."""
    s = session(tiny_lm, KeySignRetrieval(**SMALL), captions(8, seed=6))
    answer = s.ask(QUESTION, max_new_tokens=NEW)
    ids = tiny_lm.tokenizer(s.question_template.format(question=QUESTION), add_special_tokens=False)["input_ids"]
    attended = [(s.state.layers[i].long_k[0, : int(s.state.long_len), 0] > 0).sum() for i in range(2)]
    assert attended[0] != attended[1] and len(answer.tokens) == NEW
    for i in range(1, NEW):
        x, valid = s._embed_padded(ids + answer.tokens[:i], 16 * math.ceil((len(ids) + NEW) / 16))
        logits, _ = question(Executor(), tiny_lm.params, s.state, x, valid, config=tiny_lm.config,
                             method=s.method, layout=s.layout, extra=NEW)
        assert int(np.argmax(logits[0])) == answer.tokens[i], i


def test_bad_inputs_name_the_parameter(tiny_lm):
    with pytest.raises(TypeError, match="method must be a streaming method"):
        StreamSession(tiny_lm, Full())
    with pytest.raises(TypeError, match="model must be a loaded model .* got 'llava'"):
        StreamSession("llava", LIVE)
    with pytest.raises(ValueError, match="retrieve_ratio must be in"):
        StreamSession(tiny_lm, LiveVLM(retrieve_ratio=0.0, **SMALL), frame_tokens=FRAME_TOKENS)
    with pytest.raises(ValueError, match=r"vsb_score must be one of \('attention', 'keydiff'\), got 'novelty'"):
        StreamSession(tiny_lm, LiveVLM(vsb_score="novelty", **SMALL), frame_tokens=FRAME_TOKENS)
    with pytest.raises(ValueError, match="memory_tokens=4096 does not fit"):
        StreamSession(tiny_lm, LiveVLM(memory_tokens=4096, **SMALL), frame_tokens=FRAME_TOKENS)
    with pytest.raises(ValueError, match="short_frames must be an integer >= 1"):
        StreamSession(tiny_lm, FullVideo(short_frames=0))
    with pytest.raises(ValueError, match="frame_tokens must be an integer >= 1"):
        StreamSession(tiny_lm, FULL, frame_tokens=0)
    with pytest.raises(ValueError, match="question_template must be a string containing"):
        StreamSession(tiny_lm, FULL, frame_tokens=FRAME_TOKENS, question_template="Q:")
    with pytest.raises(ValueError, match="clips would attend"):
        StreamSession(tiny_lm, ReKV(short_frames=16, clip_frames=8))  # 64-token text frames: too many
    s = StreamSession(tiny_lm, LIVE, frame_tokens=FRAME_TOKENS)
    with pytest.raises(TypeError, match="text must be a string"):
        s.add_text(3)
    with pytest.raises(ValueError, match="text must hold at least one token"):
        s.add_text("")
    with pytest.raises(ValueError, match="frame_tokens=24"):
        s.add_text("word " * 40)
    with pytest.raises(TypeError, match="no vision tower"):
        s.add_frames(np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(TypeError, match="frames must be uint8 pixels"):
        s.add_frames(np.zeros((2, 8), np.float32))
    frames = np.zeros((3, 4, tiny_lm.config.hidden_size), np.float64)
    frames[1, 2, 5] = np.nan
    with pytest.raises(ValueError, match=r"frames: the embeddings of frame 1 \(of 3\) hold NaN or Inf in float32; none"):
        s.add_frames(frames)
    frames[1, 2, 5] = 1e39  # finite in float64, Inf in the session's float32
    with pytest.raises(ValueError, match="frame 1 .* hold NaN or Inf"):
        s.add_frames(frames)
    assert s.frames == 0
    hidden = tiny_lm.config.hidden_size
    broken = StreamSession(tiny_lm, LIVE, frame_tokens=FRAME_TOKENS,
                           frame_encoder=lambda pixels: np.full((len(pixels), 4, hidden), np.inf, np.float32))
    with pytest.raises(ValueError, match=r"frame_encoder: the embeddings of frame 0 \(of 2\) hold NaN or Inf"):
        broken.add_frames(np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="question must be a non-empty string"):
        s.ask("  ")
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        s.ask("Why?", max_new_tokens=0)
    with pytest.raises(ValueError, match="max_new_tokens=400 would reach position"):
        s.ask("Why?", max_new_tokens=400)


def test_frame_embeddings_enter_like_text(tiny_lm):
    """Precomputed per-frame embeddings (the VLM hook's output) give the same stream as text."""
    lines = captions(5, seed=5)
    text = session(tiny_lm, LIVE, lines)
    embedded = StreamSession(tiny_lm, LIVE, frame_tokens=FRAME_TOKENS)
    table = np.asarray(tiny_lm.params.embed)
    for line in lines:
        ids = tiny_lm.tokenizer(line, add_special_tokens=False)["input_ids"]
        embedded.add_frames(table[ids][None])
    a, b = (s.ask(QUESTION, max_new_tokens=NEW) for s in (text, embedded))
    np.testing.assert_array_equal(a.logits, b.logits)


# --- video through the tiny LLaVA-OneVision -------------------------------------------------


def test_add_video_feeds_clips_as_they_decode(tiny_vlm, tiny_video):
    """A file and a live iterator (sampled from 10 fps) give the stream of the same frames
    added as an array; the iterator's clips are encoded while it still produces frames. Frames
    pass through the vision tower (batches padded to a power of two change nothing)."""
    path, _ = tiny_video
    frames, _ = read_video(path, fps=VIDEO_FPS, max_frames=6)
    assert isinstance(tiny_vlm, VisionLanguageModel) and len(frames) == 6
    from_file, from_live, from_array = (StreamSession(tiny_vlm, LIVE) for _ in range(3))
    assert from_file.add_video(path, fps=VIDEO_FPS, max_frames=6) == 6
    encoded_while_live = []

    def camera():
        for frame in read_video(path)[0]:  # every decoded frame, at the source's 10 fps
            encoded_while_live.append(from_live.stream_tokens)
            yield frame

    assert from_live.add_video(camera(), fps=VIDEO_FPS, source_fps=10, max_frames=6) == 6
    assert encoded_while_live[-1] > 0 and len(encoded_while_live) > 20
    from_array.add_frames(frames[:4])  # vision batches of 4 (padded from 3 below) and 2: compiled once
    from_array.add_frames(frames[4:])
    file, live, array = (s.ask(QUESTION, max_new_tokens=NEW) for s in (from_file, from_live, from_array))
    np.testing.assert_array_equal(file.logits, live.logits)
    np.testing.assert_allclose(file.logits, array.logits, atol=1e-4, rtol=0)  # other vision batches
    assert file.tokens == live.tokens == array.tokens and file.stats["frames"] == 6
    c = tiny_vlm.llava_config
    pooled = jax.jit(llava.video_features, static_argnames="config")(
        tiny_vlm.llava_params, jnp.asarray(preprocess_frames(frames[:3], tiny_vlm.preprocess)), config=c)
    np.testing.assert_allclose(np.asarray(tiny_vlm.encode_frames(frames[:3])),
                               np.asarray(pooled).reshape(3, c.tokens_per_frame, -1), atol=1e-5, rtol=0)


# --- the real model -------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_livevlm_retrieves_an_early_fact_that_recent_memory_lost(smollm2):
    """A ~1.5k-token caption stream with one early number, asked completion-style. LiveVLM's
    Position-agnostic Retrieval (40% of the long-term pages) answers; StreamingLLM attending
    the same number of tokens (sinks + the most recent ones) has evicted the fact.

    M covers the stream here: with M below it, Vision Sink Bucketing evicts the fact's content
    words (measured: " door", " code", " written" gone at layer 0 at 1.5x-2x compression of a
    2.3k-token stream) and the model answers a minute number instead, unless VSB ranks by
    key distinctness (the next test).
    """
    stream = caption_stream(100, seed=0, fact_at=0.1)
    s = session(smollm2, LiveVLM(memory_tokens=2048), stream.lines)
    live = s.ask(FACT_QUESTION, max_new_tokens=6, answer_prefix=ANSWER_PREFIX)
    stats = live.stats
    assert stats["attended_memory_tokens"] < 0.6 * stats["stream_tokens"]
    init, template = default_templates(smollm2.tokenizer)
    recent = generate(smollm2, init + "".join(stream.lines),
                      question=template.format(question=FACT_QUESTION) + ANSWER_PREFIX,
                      method=StreamingLLM(budget=stats["attended_memory_tokens"] + stats["question_tokens"]),
                      max_new_tokens=6)
    assert stream.correct(live.text), live.text
    assert not stream.correct(recent.text), recent.text


@pytest.mark.slow
def test_smollm2_keydiff_vsb_keeps_an_early_fact_that_attention_vsb_drops(smollm2):
    """bench/stream_qa's 3k-token stream (seed 0, fact at 5%) at M = 1536 (1.7x compression):
    VSB by attention thins out the fact's tokens and the model answers a minute number; VSB
    by key distinctness keeps them."""
    stream = caption_stream(lines_for_tokens(smollm2.tokenizer, 3000), seed=0, fact_at=0.05)
    answers = {score: session(smollm2, LiveVLM(memory_tokens=1536, vsb_score=score), stream.lines).ask(
        FACT_QUESTION, max_new_tokens=6, answer_prefix=ANSWER_PREFIX).text for score in ("attention", "keydiff")}
    assert stream.correct(answers["keydiff"]) and not stream.correct(answers["attention"]), answers


def test_rekv_bfloat16_host_frames_are_retrieved_exactly_without_converting_the_store():
    """ReKV keeps bfloat16 long-term K/V in host memory as their uint16 bits: retrieval returns
    the chosen frames' exact tokens per KV head, and the compiled store + retrieval convert
    no whole host array to float32 (XLA's CPU backend computes bfloat16 in float32)."""
    import re

    layout = StreamLayout(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, init_tokens=4, frame_tokens=4,
                          max_position=4096, dtype=jnp.bfloat16)
    method = ReKV(retrieve_frames=2, **SMALL)
    state = method.init_state(layout)
    layer = state.layers[0]
    assert layer.long_k.dtype == jnp.uint16 and layer.long_k.sharding.memory_kind == "pinned_host"
    hkv, cap, d = layer.long_k.shape
    rng = np.random.default_rng(3)
    n = 2 * layout.frame_tokens * 2  # one clip of 2 frames leaves the FIFO twice: 4 frames
    moved_k = jnp.asarray(rng.standard_normal((hkv, n, d)), jnp.bfloat16)
    moved_v = jnp.asarray(rng.standard_normal((hkv, n, d)), jnp.bfloat16)

    def run(layer, state, q):
        for clip in range(2):  # two moves of 2 frames of 4 tokens
            part = slice(clip * 8, clip * 8 + 8)
            frame = jnp.repeat(jnp.arange(2) + 2 * clip, 4)
            moved = Moved(k=moved_k[:, part], v=moved_v[:, part], valid=jnp.ones(8, bool), frame=frame, scores=None)
            layer = method.store(layout, layer, state, moved, None)
            state = method.update_index(layout, state, moved.valid, moved.frame)
        return method.retrieve(layout, layer, state, q, jnp.ones(q.shape[0], bool))

    # Queries along frame 3's and frame 1's mean keys: those two frames come back in temporal order.
    means = np.asarray(moved_k, np.float32).reshape(hkv, 4, 4, d).mean(axis=2)  # [Hkv, frame, d]
    q = np.broadcast_to(np.repeat(means[:, 1] + means[:, 3], 2, axis=0)[None], (1, 4, d)) * 10
    fn = jax.jit(run)
    k, v, valid = fn(layer, state, jnp.asarray(q, jnp.float32))
    np.testing.assert_array_equal(np.asarray(valid), np.ones(8, bool))
    for got, want in ((k, moved_k), (v, moved_v)):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got[:, :8], np.float32),
                                      np.asarray(want, np.float32)[:, np.r_[4:8, 12:16]])
    hlo = fn.lower(layer, state, jnp.asarray(q, jnp.float32)).compile().as_text()
    sizes = {math.prod(map(int, s.split(","))) for s in re.findall(r"f32\[([\d,]+)\]", hlo)}
    assert hkv * cap * d not in sizes


def test_nan_logits_in_an_answer_raise(tiny_lm):
    """A question token whose embedding is NaN: `ask` raises at the answer's first step
    instead of answering from NaN logits."""
    from tests.conftest import with_nan_embedding

    lines = captions(4, seed=8)
    in_stream = {t for line in lines for t in tiny_lm.tokenizer(line, add_special_tokens=False)["input_ids"]}
    question = tiny_lm.tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    token = next(t for t in question if t not in in_stream)
    s = session(with_nan_embedding(tiny_lm, token), FULL, lines)
    with pytest.raises(FloatingPointError, match=r"\(sequence 0 at step 0;"):
        s.ask(QUESTION, max_new_tokens=NEW)
