"""Video input: frames from a file (PyAV), a numpy array, or a live iterator, sampled at a target fps.

Every source yields `VideoFrame`s (uint8 `[H, W, 3]` RGB and a time in seconds). With `fps`
set, at most `fps` frames per second are kept: the first frame at or after each multiple of
`1 / fps` (a source slower than `fps` keeps all its frames; none is duplicated).

- a path: decoded with PyAV; times come from the stream's timestamps;
- an array `[T, H, W, 3]` uint8: frame `i` is at `i / source_fps`;
- an iterable of `[H, W, 3]` uint8 frames (a camera, a generator): consumed lazily, frame `i`
  at `i / source_fps`, each frame checked as it arrives.

Without `source_fps`, array and iterator frames are taken as already sampled: every one is kept,
frame `i` at `i / fps` (or `i` seconds when `fps` is None too).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import os
from collections.abc import Callable, Generator, Iterable, Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np

TIME_EPS = 1e-6  # timestamps are rounded to the stream's time base; sample times are not


@dataclasses.dataclass(frozen=True)
class VideoFrame:
    image: np.ndarray  # uint8 [H, W, 3], RGB
    time: float  # seconds since the start of the source


def _check_rate(value: float | None, name: str) -> float | None:
    """A frame rate argument as a float (None passes through); a ValueError names `name`."""
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if value is not None and not (is_number and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0 (frames per second) or None, got {value!r}")
    return None if value is None else float(value)


def _check_frame(frame: object, name: str) -> np.ndarray:
    """`frame` if it is a uint8 `[H, W, 3]` array, else an error naming `name`."""
    if not isinstance(frame, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(frame).__name__}")
    if frame.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 RGB, got dtype {frame.dtype}")
    if frame.ndim != 3 or frame.shape[-1] != 3 or 0 in frame.shape:
        raise ValueError(f"{name} must have shape [H, W, 3] with H, W >= 1, got {frame.shape}")
    return frame


def _open_video(path: Path) -> av.container.InputContainer:
    """Open `path` and check it has a video stream (eagerly, so errors surface at the call)."""
    if not path.is_file():
        raise FileNotFoundError(f"source: video file not found: {path}")
    try:
        container = av.open(str(path))
    except av.FFmpegError as e:
        raise ValueError(f"source: cannot open {path} as a video: {e}") from e
    if not container.streams.video:
        container.close()
        raise ValueError(f"source: {path} has no video stream")
    return container


def _decode(
    container: av.container.InputContainer, path: Path
) -> Generator[tuple[float, av.VideoFrame], None, None]:
    """`(time, frame)` of every frame of the first video stream; closes `container` when done."""
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        rate = float(stream.average_rate) if stream.average_rate else None
        try:
            for i, frame in enumerate(container.decode(stream)):
                if frame.time is not None:
                    time = frame.time - start
                elif rate:
                    time = i / rate
                else:
                    raise ValueError(f"source: {path} has frames without timestamps and no frame rate")
                yield time, frame
        except av.FFmpegError as e:
            raise ValueError(f"source: error decoding {path}: {e}") from e


def iter_frames(
    source: str | os.PathLike | np.ndarray | Iterable[np.ndarray],
    fps: float | None = None,
    *,
    source_fps: float | None = None,
    max_frames: int | None = None,
) -> Iterator[VideoFrame]:
    """Frames of `source` sampled at `fps` (all frames when None), lazily; see the module doc.

    Raises FileNotFoundError for a missing file, ValueError for an undecodable file, a bad rate
    or a frame of the wrong dtype or shape, TypeError for an unsupported `source`; messages name
    the parameter (`source`, `source[i]`, `fps`, `source_fps`, `max_frames`). A file or array
    is checked at the call, an iterator's frames as they arrive.
    """
    fps = _check_rate(fps, "fps")
    source_fps = _check_rate(source_fps, "source_fps")
    if max_frames is not None and (not isinstance(max_frames, int) or max_frames < 1):
        raise ValueError(f"max_frames must be an int >= 1 or None, got {max_frames!r}")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        return _sample(_decode(_open_video(path), path), fps, _to_rgb, max_frames)
    # Without source_fps the frames are taken as already sampled: all kept, fps only times them.
    sample_fps = fps if source_fps is not None else None
    return _sample(_timed_frames(source, fps, source_fps), sample_fps, _identity, max_frames)


def _to_rgb(frame: av.VideoFrame) -> np.ndarray:
    return frame.to_ndarray(format="rgb24")


def _identity(frame: np.ndarray) -> np.ndarray:
    return frame


def _timed_frames(
    source: np.ndarray | Iterable[np.ndarray], fps: float | None, source_fps: float | None
) -> Generator[tuple[float, np.ndarray], None, None]:
    """`(time, frame)` of an array or iterable source, each frame validated."""
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8:
            raise ValueError(f"source must be uint8 RGB frames, got dtype {source.dtype}")
        if source.ndim != 4 or source.shape[-1] != 3:
            raise ValueError(f"source must have shape [T, H, W, 3], got {source.shape}")
    elif not isinstance(source, Iterable) or isinstance(source, (bytes, dict)):
        raise TypeError(
            "source must be a video file path, a uint8 array [T, H, W, 3] or an iterable of uint8 "
            f"[H, W, 3] frames, got {type(source).__name__}"
        )
    rate = source_fps or fps or 1.0
    return ((i / rate, _check_frame(frame, f"source[{i}]")) for i, frame in enumerate(source))


def _sample(
    timed: Generator[tuple[float, Any], None, None],
    fps: float | None,
    convert: Callable[[Any], np.ndarray],
    max_frames: int | None,
) -> Iterator[VideoFrame]:
    """Keep the first frame at or after each multiple of 1/fps (every frame when fps is None).

    Stops after `max_frames` frames and closes `timed` (and so the file) however it ends.
    """
    with contextlib.closing(timed):
        kept, next_time = 0, 0.0
        for time, frame in timed:
            if fps is not None:
                if time < next_time - TIME_EPS:
                    continue
                next_time = (math.floor(time * fps + TIME_EPS) + 1) / fps
            yield VideoFrame(image=convert(frame), time=float(time))
            kept += 1
            if kept == max_frames:
                return


def read_video(
    source: str | os.PathLike | np.ndarray | Iterable[np.ndarray],
    fps: float | None = None,
    *,
    source_fps: float | None = None,
    max_frames: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """All sampled frames at once: `(frames uint8 [T, H, W, 3], times float64 [T])`.

    Arguments as in `iter_frames`; frames of differing sizes raise a ValueError naming `source`.
    """
    frames = list(iter_frames(source, fps, source_fps=source_fps, max_frames=max_frames))
    if not frames:
        return np.zeros((0, 0, 0, 3), np.uint8), np.zeros((0,), np.float64)
    shapes = {f.image.shape for f in frames}
    if len(shapes) > 1:
        raise ValueError(f"source frames differ in size {sorted(shapes)}; use iter_frames for such a source")
    return np.stack([f.image for f in frames]), np.asarray([f.time for f in frames], np.float64)


def clips(
    source: str | os.PathLike | np.ndarray | Iterable[np.ndarray],
    clip_frames: int,
    fps: float | None = None,
    *,
    source_fps: float | None = None,
    max_frames: int | None = None,
) -> Iterator[np.ndarray]:
    """Sampled frames grouped into uint8 arrays `[T, H, W, 3]`, lazily: `clip_frames`
    consecutive frames each, fewer where the frame size changes and at the end. A live source's
    clip comes out as soon as its last frame arrives. Other arguments as in `iter_frames`."""
    if not isinstance(clip_frames, int) or isinstance(clip_frames, bool) or clip_frames < 1:
        raise ValueError(f"clip_frames must be an int >= 1, got {clip_frames!r}")
    clip: list[np.ndarray] = []
    for frame in iter_frames(source, fps, source_fps=source_fps, max_frames=max_frames):
        if clip and frame.image.shape != clip[0].shape:
            yield np.stack(clip)
            clip = []
        clip.append(frame.image)
        if len(clip) == clip_frames:
            yield np.stack(clip)
            clip = []
    if clip:
        yield np.stack(clip)
