"""`StreamSession`: feed a stream of frames, ask questions at any time (ALGORITHMS.md section 5).

```python
session = kvjax.StreamSession(model, method=LiveVLM())
session.add_text("Minute 1: a cyclist crossed the square.\\n")   # one text "frame"
session.add_frames(frames)      # pixels through the model's `encode_frames`, or embeddings
session.add_video("clip.mp4", fps=0.5)   # a file, a frame array or a live iterator of frames
answer = session.ask("What happened first?", max_new_tokens=32, answer_prefix="First,")
answer.text, answer.tokens, answer.stats["ttft_s"]
```

Prompt layout: `init` (system prompt and user prefix), the frames, then each question rendered
with `question_template`. Both default to the tokenizer's chat template split around the user
message (`\\n{question}<|im_end|>\\n<|im_start|>assistant\\n` for ChatML models). Frames are
buffered and encoded `clip_frames` at a time; `ask` first encodes a pending partial clip.
Passes run layer by layer, one function compiled per shape for all layers
(`kvjax.stream_forward`; clip and question lengths are bucketed); clip encoding donates the
stream state.

Frames of a vision-language model enter through a hook: `frame_encoder(frames)` (default
`model.encode_frames` when the model has it) maps uint8 frames `[T, H, W, 3]` to per-frame
token embeddings `[T, n, hidden]`; `add_frames` also takes such embeddings directly.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from kvjax import sharding
from kvjax.checks import check_count
from kvjax.cache import Cache, kv_bytes
from kvjax.generation import check_generation_args, _decode_jit, check_finite_logits, check_model, prompt_bucket
from kvjax.methods.livevlm import LiveVLM
from kvjax.methods.stream_memory import StreamLayout, StreamMethod
from kvjax.stream_forward import AnswerDecode, Executor, encode_clip, encode_init
from kvjax.stream_forward import question as question_pass
from kvjax.video import clips
from models.bundle import Model

DEFAULT_TEXT_FRAME_TOKENS = 64
DEFAULT_FPS = 0.5  # frames sampled per second of video (ALGORITHMS.md section 5)
_PLACEHOLDER = "\x00STREAM-QUESTION\x00"


@dataclasses.dataclass(frozen=True)
class FirstToken:
    token: int  # the greedy first token
    logits: jax.Array  # [1, V] its logits
    cache: Cache  # the attended tokens and the question, for the decode loop (`AnswerDecode`)
    stats: dict[str, Any]  # ttft_s, flush_s, question_tokens, attended_memory_tokens, compile_s


@dataclasses.dataclass(frozen=True)
class StreamAnswer:
    text: str  # generated text (the answer prefix not included)
    tokens: list[int]  # generated ids
    logits: np.ndarray  # [V] logits of the first generated token
    stats: dict[str, Any]  # ttft_s, decode_s, memory sizes, ...


def default_templates(tokenizer) -> tuple[str, str]:
    """(init prompt, question template) from the tokenizer's chat template, split around the
    user message; plain text ("", "\\n{question}\\n") when it has none."""
    if not getattr(tokenizer, "chat_template", None):
        return "", "\n{question}\n"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": _PLACEHOLDER}], tokenize=False, add_generation_prompt=True
    )
    init, after = rendered.split(_PLACEHOLDER)
    return init, "\n{question}" + after.replace("{", "{{").replace("}", "}}")


class StreamSession:
    """One live stream over `model` with a streaming KV method (`LiveVLM`, `ReKV`, `FullVideo`).

    `mesh` (`kvjax.sharding.make_mesh`): run on those devices, the KV heads split over its
    `model` axis (a stream is one sequence: `data` replicates it).
    """

    def __init__(
        self,
        model: Model,
        method: StreamMethod | None = None,
        *,
        init_prompt: str | None = None,
        question_template: str | None = None,
        frame_tokens: int | None = None,
        frame_encoder: Callable[[np.ndarray], Any] | None = None,
        mesh: Mesh | None = None,
    ) -> None:
        check_model(model)
        method = LiveVLM() if method is None else method
        if not isinstance(method, StreamMethod):
            raise TypeError(f"method must be a streaming method (LiveVLM(), ReKV(), FullVideo()), got {method!r}")
        default_init, default_question = default_templates(model.tokenizer)
        init_prompt = default_init if init_prompt is None else init_prompt
        question_template = default_question if question_template is None else question_template
        if not isinstance(init_prompt, str):
            raise TypeError(f"init_prompt must be a string, got {type(init_prompt).__name__}")
        if not isinstance(question_template, str) or "{question}" not in question_template:
            raise ValueError(f"question_template must be a string containing '{{question}}', got {question_template!r}")
        if frame_tokens is None:
            frame_tokens = getattr(model, "tokens_per_frame", DEFAULT_TEXT_FRAME_TOKENS)
        check_count("frame_tokens", frame_tokens)
        if mesh is not None:
            model = sharding.shard_model(model, mesh)
        self.model, self.method, self.mesh = model, method, mesh
        self.question_template = question_template
        self.frame_encoder = frame_encoder if frame_encoder is not None else getattr(model, "encode_frames", None)
        c = model.config
        init_ids = list(model.tokenizer(init_prompt, add_special_tokens=True)["input_ids"]) if init_prompt else []
        self.layout = StreamLayout(
            num_layers=c.num_layers, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
            init_tokens=prompt_bucket(len(init_ids)), frame_tokens=frame_tokens,
            max_position=c.max_position_embeddings, dtype=model.params.embed.dtype,
        )
        method.validate(self.layout)
        bound = method.encode_bound(self.layout)
        if bound is not None and bound > c.max_position_embeddings:
            raise ValueError(
                f"clips would attend {bound} positions (init {self.layout.init_tokens} + memory + "
                f"short_frames * frame_tokens + clip_frames * frame_tokens), beyond the model's trained "
                f"context of {c.max_position_embeddings}: reduce short_frames, clip_frames or frame_tokens"
            )
        self._executor = Executor(mesh=mesh)
        self.encode_s = 0.0
        self.frames = 0  # frames encoded or pending
        self.stream_tokens = 0
        self._pending: list[np.ndarray] = []  # frame embeddings [n, D] waiting for a full clip
        # Clips are assembled on the host: one transfer per clip, no eager op per frame length.
        self._embed = np.asarray(model.params.embed)
        state = sharding.place(method.init_state(self.layout), mesh)
        x, valid = self._embed_padded(init_ids, self.layout.init_tokens)
        self.state = self._run(encode_init, model.params, state, x, valid, config=c)

    @property
    def compile_s(self) -> float:
        """Seconds spent compiling the session's passes so far."""
        return self._executor.compile_s

    # --- input ---------------------------------------------------------------------------------

    def add_text(self, text: str) -> None:
        """Add one text frame (a caption line: separators such as "\\n" are part of `text`)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        ids = list(self.model.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ValueError("text must hold at least one token, got an empty frame")
        self._add([self._embed[ids]], "text")

    def add_frames(self, frames: Any) -> None:
        """Add frames: uint8 pixels [T, H, W, 3] (through `frame_encoder`) or per-frame token
        embeddings [T, n, hidden] (a float array, used as they are). Embeddings holding NaN or
        Inf (in the session's dtype) are refused before anything is added: they would poison
        every later answer of the stream."""
        arr = frames if isinstance(frames, jax.Array) else np.asarray(frames)
        hidden = self.model.config.hidden_size
        if arr.ndim == 3 and jnp.issubdtype(arr.dtype, jnp.floating) and arr.shape[-1] == hidden:
            embeddings, source = arr, "frames"
        elif arr.ndim == 4 and arr.dtype == np.uint8 and arr.shape[-1] == 3:
            if self.frame_encoder is None:
                raise TypeError(
                    f"add_frames got pixel frames {tuple(arr.shape)} but model {self.model.name or type(self.model).__name__!r} "
                    f"has no vision tower (no encode_frames): pass frame_encoder=..., per-frame token "
                    f"embeddings [T, n, {hidden}], or use add_text"
                )
            embeddings, source = self.frame_encoder(arr), "frame_encoder"
        else:
            raise TypeError(
                f"frames must be uint8 pixels [T, H, W, 3] or float embeddings [T, n, {hidden}], "
                f"got {arr.dtype} {tuple(arr.shape)}"
            )
        with np.errstate(over="ignore"):  # an overflow to Inf is reported just below
            embeddings = [np.asarray(e, self._embed.dtype) for e in embeddings]
        bad = [i for i, e in enumerate(embeddings) if not np.isfinite(e).all()]
        if bad:
            raise ValueError(
                f"{source}: the embeddings of frame {bad[0]} (of {len(embeddings)}) hold NaN or Inf in "
                f"{self._embed.dtype}; none of the {len(embeddings)} frames was added"
            )
        self._add(embeddings, "frames")

    def add_video(
        self,
        source: str | os.PathLike | np.ndarray | Iterable[np.ndarray],
        fps: float | None = DEFAULT_FPS,
        *,
        source_fps: float | None = None,
        max_frames: int | None = None,
    ) -> int:
        """Add the frames of a video file, a uint8 array `[T, H, W, 3]` or an iterable of
        `[H, W, 3]` frames (a live source), sampled at `fps` (None: every frame) and fed clip by
        clip as they are decoded (`kvjax.video.clips`). Returns the number of frames added."""
        added = 0
        for clip in clips(source, self.method.clip_frames, fps, source_fps=source_fps, max_frames=max_frames):
            self.add_frames(clip)
            added += len(clip)
        return added

    def _add(self, frames: list[np.ndarray], name: str) -> None:
        for f in frames:
            if f.shape[0] > self.layout.frame_tokens:
                raise ValueError(
                    f"{name}: a frame of {f.shape[0]} tokens exceeds frame_tokens={self.layout.frame_tokens} "
                    f"(set StreamSession(frame_tokens=...) higher)"
                )
        self._pending.extend(frames)
        self.frames += len(frames)
        self.stream_tokens += sum(int(f.shape[0]) for f in frames)
        while len(self._pending) >= self.method.clip_frames:
            clip, self._pending = self._pending[: self.method.clip_frames], self._pending[self.method.clip_frames:]
            self._encode(clip)

    def flush(self) -> None:
        """Encode the pending frames of a partial clip now."""
        if self._pending:
            clip, self._pending = self._pending, []
            self._encode(clip)

    def _encode(self, clip: list[np.ndarray]) -> None:
        n = sum(int(f.shape[0]) for f in clip)
        t = min(prompt_bucket(n), self.method.move_capacity(self.layout))
        x = np.zeros((t, self.model.config.hidden_size), self._embed.dtype)
        x[:n] = np.concatenate(clip)
        first = self.frames - len(self._pending) - len(clip)
        frame = np.full(t, -1, np.int32)
        frame[:n] = np.repeat(np.arange(first, first + len(clip)), [int(f.shape[0]) for f in clip])
        state = sharding.place(self.method.grow(self.state, self.layout), self.mesh)
        self.state = self._run(encode_clip, self.model.params, state, *(sharding.replicate(a, self.mesh) for a in (x, frame)),
                               config=self.model.config, method=self.method, layout=self.layout)

    def _embed_padded(self, ids: list[int], size: int) -> tuple[jax.Array, jax.Array]:
        """Embeddings of `ids` right-padded to `size` rows, and the valid mask."""
        x = np.zeros((size, self._embed.shape[1]), self._embed.dtype)
        x[: len(ids)] = self._embed[ids]
        return sharding.replicate(x, self.mesh), sharding.replicate(np.arange(size) < len(ids), self.mesh)

    def _run(self, stream_pass, *args, **kwargs):
        """Run an encoding pass of `kvjax.stream_forward`; its time (without compilation) adds
        to `encode_s`."""
        out, seconds = self._executor.timed(stream_pass, *args, **kwargs)
        self.encode_s += seconds
        return out

    # --- questions -----------------------------------------------------------------------------

    def first_token(self, question: str, answer_prefix: str | None = None, max_new_tokens: int = 32) -> FirstToken:
        """The start of an answer, timed: retrieval, the question prefill and the first
        (greedy) token (`ttft_s`). A pending partial clip is encoded before the clock starts
        (`flush_s`). `max_new_tokens` sizes the answer cache; `ask` continues from here."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"question must be a non-empty string, got {question!r}")
        if answer_prefix is not None and not isinstance(answer_prefix, str):
            raise TypeError(f"answer_prefix must be a string or None, got {type(answer_prefix).__name__}")
        check_generation_args(max_new_tokens, 0.0, 1.0)
        config = self.model.config
        t0 = time.perf_counter()
        self.flush()
        flush_s = time.perf_counter() - t0
        text = self.question_template.format(question=question) + (answer_prefix or "")
        ids = list(self.model.tokenizer(text, add_special_tokens=False)["input_ids"])
        t = prompt_bucket(len(ids))
        bound = self.method.answer_bound(self.layout, t + max_new_tokens)
        if bound is not None and bound > config.max_position_embeddings:
            raise ValueError(
                f"question ({len(ids)} tokens) + max_new_tokens={max_new_tokens} would reach position {bound}, "
                f"beyond the model's trained context of {config.max_position_embeddings}"
            )
        x, valid = self._embed_padded(ids, t)
        compile_before = self.compile_s

        def start(run: Executor):
            logits, cache = question_pass(run, self.model.params, self.state, x, valid, config=config,
                                          method=self.method, layout=self.layout, extra=max_new_tokens)
            return logits, cache, jnp.argmax(logits[0])

        (logits, cache, token), ttft_s = self._executor.timed(start)
        memory = int(cache.lengths[0]) - len(ids)  # slots before the question; each layer's start lies below
        attended = round(float(np.mean([memory - int(layer.start[0]) for layer in cache.layers])))
        stats = {"ttft_s": ttft_s, "flush_s": flush_s, "question_tokens": len(ids),
                 "attended_memory_tokens": attended,  # mean over layers (each retrieves its own), rounded
                 "compile_s": self.compile_s - compile_before}
        return FirstToken(token=int(token), logits=logits, cache=cache, stats=stats)

    def ask(
        self,
        question: str,
        max_new_tokens: int = 32,
        answer_prefix: str | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> StreamAnswer:
        """Answer `question` from the stream so far; the stream continues unchanged after it.

        `answer_prefix` is fed after the rendered question, before generation. `ttft_s` covers
        retrieval, the question prefill and the first token (`first_token`).
        """
        check_generation_args(max_new_tokens, temperature, top_p, seed)
        start = self.first_token(question, answer_prefix, max_new_tokens)
        model = self.model
        decode_args = (
            model.params, start.cache, start.logits, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1,), jnp.int32),
            jnp.int32(max_new_tokens), jnp.asarray(model.eos_token_ids or (-1,), jnp.int32), jax.random.key(seed),
            jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p),
        )
        compile_before = self.compile_s
        decode_exe = self._executor.compile(_decode_jit, decode_args, config=model.config, method=AnswerDecode(),
                                            greedy=temperature == 0.0, out_size=max_new_tokens)
        t0 = time.perf_counter()
        out, count, _, bad, _ = decode_exe(*decode_args)
        tokens = np.asarray(out)[0, : int(count[0])].tolist()
        decode_s = time.perf_counter() - t0
        check_finite_logits(np.asarray(bad), self.method)
        stats = {**start.stats, "decode_s": decode_s, "generated_tokens": len(tokens),
                 "compile_s": start.stats["compile_s"] + self.compile_s - compile_before, **self.memory_stats()}
        return StreamAnswer(text=model.tokenizer.decode(tokens, skip_special_tokens=True), tokens=tokens,
                            logits=np.asarray(start.logits[0]), stats=stats)

    def memory_stats(self) -> dict[str, Any]:
        """Sizes of the stream memory now: frames, tokens per segment, bytes by memory kind."""
        device, host = kv_bytes(self.state)
        return {
            "frames": self.frames,
            "stream_tokens": self.stream_tokens,
            "init_tokens": int(self.state.init_len),
            "long_term_tokens": int(self.state.long_len),
            "short_term_tokens": int(self.state.short_len),
            "device_kv_bytes": device,
            "host_kv_bytes": host,
            "encode_s": self.encode_s,
            "method": self.method.describe(),
        }
