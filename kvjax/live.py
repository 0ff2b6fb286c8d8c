"""Live play: a video fed to a `StreamSession` at its own pace while questions arrive.

Two daemon threads produce events on one queue: the video's sampled frames, each released at
its time in the video divided by `speed`, and the questions (lines of stdin, say). The calling
thread alone touches the session: it takes the events in arrival order, adds each frame (a clip
is encoded when its last frame arrives) and answers each question against the frames that
arrived before it (`ask` encodes a pending partial clip first), so questions are answered
between clips and the session is never used by two threads. Frames arriving while a question
is answered wait in the queue: none is dropped.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from kvjax.stream import DEFAULT_FPS, StreamAnswer, StreamSession
from kvjax.video import iter_frames


@dataclasses.dataclass(frozen=True)
class LiveAnswer:
    question: str
    answer: StreamAnswer
    frames: int  # frames in the stream when the question was answered
    video_time_s: float | None  # time in the video of the last of those frames (0 before any; None: unknown)


def _feed_frames(events: queue.Queue, stop: threading.Event, frames: Iterable[Any], speed: float) -> None:
    """Put ("frame", VideoFrame) events at the video's pace, then ("video_end", error or None)."""
    error = None
    try:
        start = time.monotonic()
        for frame in frames:
            delay = start + frame.time / speed - time.monotonic() if speed > 0 else 0.0
            if stop.wait(max(0.0, delay)):  # the consumer has stopped
                return
            events.put(("frame", frame))
    except Exception as e:  # noqa: BLE001 - re-raised by the consuming thread
        error = e
    finally:
        events.put(("video_end", error))


def _feed_questions(events: queue.Queue, questions: Iterable[str]) -> None:
    """Put a ("question", text) event per non-blank line, then ("questions_end", error or None)."""
    error = None
    try:
        for line in questions:
            if line.strip():
                events.put(("question", line.strip()))
    except Exception as e:  # noqa: BLE001 - re-raised by the consuming thread
        error = e
    finally:
        events.put(("questions_end", error))


def play(
    session: StreamSession,
    source: str | os.PathLike | np.ndarray | Iterable[np.ndarray],
    questions: Iterable[str],
    *,
    fps: float | None = DEFAULT_FPS,
    source_fps: float | None = None,
    max_frames: int | None = None,
    speed: float = 1.0,
    on_answer: Callable[[LiveAnswer], None] | None = None,
    **ask_kwargs: Any,
) -> list[LiveAnswer]:
    """Play `source` (as `kvjax.video.iter_frames` reads it) into `session` while answering
    `questions` as they arrive; returns when both have ended. `speed`: playback speed (2.0
    plays twice as fast; 0 feeds frames as fast as they decode). Each answer goes to
    `on_answer` as soon as it is ready; `ask_kwargs` go to `session.ask`.
    """
    if not isinstance(speed, (int, float)) or isinstance(speed, bool) or not speed >= 0:
        raise ValueError(f"speed must be a number >= 0 (0: no pacing), got {speed!r}")
    frames = iter_frames(source, fps, source_fps=source_fps, max_frames=max_frames)  # checks the source now
    events: queue.Queue = queue.Queue()
    stop = threading.Event()
    for target, args in ((_feed_frames, (events, stop, frames, speed)), (_feed_questions, (events, questions))):
        threading.Thread(target=target, args=args, daemon=True).start()
    answers: list[LiveAnswer] = []
    video_time, running = 0.0, {"video_end", "questions_end"}
    try:
        while running:
            kind, item = events.get()
            if kind == "frame":
                session.add_frames(item.image[None])
                video_time = item.time
            elif kind == "question":
                answer = LiveAnswer(item, session.ask(item, **ask_kwargs), session.frames, video_time)
                answers.append(answer)
                if on_answer is not None:
                    on_answer(answer)
            else:
                if item is not None:
                    raise item
                running.discard(kind)
    finally:
        stop.set()
    return answers
