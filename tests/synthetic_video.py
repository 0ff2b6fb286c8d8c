"""A small synthetic video for decoding and preprocessing tests, encoded with PyAV.

The background colour changes every second (`BACKGROUNDS`), and a white square moves left to
right across the frame, so a decoded frame's time can be checked from its content.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

BACKGROUNDS = [(200, 30, 30), (30, 180, 40), (40, 60, 210), (220, 200, 40)]  # one per second
SQUARE = 16  # side of the moving white square, pixels


def render_frame(index: int, fps: int, height: int, width: int) -> np.ndarray:
    """Frame `index` (uint8 [H, W, 3]): the second's background and the square at its position."""
    seconds = index / fps
    frame = np.empty((height, width, 3), np.uint8)
    frame[:] = BACKGROUNDS[int(seconds) % len(BACKGROUNDS)]
    left = square_left(index, fps, width, seconds_total=len(BACKGROUNDS))
    top = (height - SQUARE) // 2
    frame[top : top + SQUARE, left : left + SQUARE] = 255
    return frame


def square_left(index: int, fps: int, width: int, seconds_total: int) -> int:
    """Left edge of the square in frame `index`: it crosses the frame once in `seconds_total`."""
    return int((width - SQUARE) * index / (fps * seconds_total))


def write_video(path: Path, fps: int = 10, height: int = 96, width: int = 128) -> int:
    """Encode `len(BACKGROUNDS)` seconds at `fps` with H.264 (near-lossless); returns the frame count."""
    import av

    frames = fps * len(BACKGROUNDS)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "4", "preset": "ultrafast"}
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(render_frame(i, fps, height, width), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return frames
