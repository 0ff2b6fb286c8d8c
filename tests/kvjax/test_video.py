"""Video input: a PyAV-encoded file of coloured moving shapes, numpy arrays, live iterators, errors."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("av", reason="PyAV (`av`) is needed to encode and decode test videos")

from kvjax.video import iter_frames, read_video  # noqa: E402
from tests.synthetic_video import BACKGROUNDS, render_frame, square_left, write_video  # noqa: E402

FPS, HEIGHT, WIDTH = 10, 96, 128


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "shapes.mp4"
    return path, write_video(path, fps=FPS, height=HEIGHT, width=WIDTH)


def _square_left(frame: np.ndarray) -> int:
    """Left edge of the white square: first column whose middle row is near white."""
    row = frame[HEIGHT // 2].astype(int)
    return int(np.argmax(row.min(axis=-1) > 230))


def test_file_decoded_at_target_fps(video):
    path, total = video
    frames, times = read_video(path, fps=2.0)
    seconds = total / FPS
    assert frames.shape == (int(seconds * 2), HEIGHT, WIDTH, 3) and frames.dtype == np.uint8
    np.testing.assert_allclose(times, np.arange(len(frames)) / 2.0, atol=1e-6)
    for frame, t in zip(frames, times):
        corner = frame[:8, :8].reshape(-1, 3).mean(axis=0)  # background, away from the square
        np.testing.assert_allclose(corner, BACKGROUNDS[int(t)], atol=8)
        assert abs(_square_left(frame) - square_left(round(t * FPS), FPS, WIDTH, len(BACKGROUNDS))) <= 1
    lefts = [_square_left(f) for f in frames]
    assert lefts == sorted(lefts) and lefts[-1] - lefts[0] > WIDTH // 2  # it moves right


def test_file_all_frames_and_rates(video):
    path, total = video
    frames, times = read_video(path)
    assert len(frames) == total
    np.testing.assert_allclose(times, np.arange(total) / FPS, atol=1e-6)
    # 3 fps from 10 fps: the first frame at or after each third of a second.
    _, times = read_video(path, fps=3.0)
    np.testing.assert_allclose(times[:4], [0.0, 0.4, 0.7, 1.0], atol=1e-6)
    # Faster than the source: every frame once, none duplicated.
    assert len(read_video(path, fps=25.0)[0]) == total
    first = list(iter_frames(path, fps=1.0, max_frames=2))
    assert [f.time for f in first] == [0.0, 1.0]


def test_numpy_array_source():
    frames = np.stack([render_frame(i, FPS, 32, 48) for i in range(20)])
    out, times = read_video(frames, fps=2.0, source_fps=FPS)  # subsampled by time
    np.testing.assert_array_equal(out, frames[::5])
    np.testing.assert_allclose(times, [0.0, 0.5, 1.0, 1.5])
    out, times = read_video(frames, fps=2.0)  # already sampled: kept, timed at 1/fps
    assert len(out) == 20 and times[1] == 0.5
    assert [f.time for f in iter_frames(frames, max_frames=3)] == [0.0, 1.0, 2.0]


def test_live_iterator_source_is_lazy():
    produced = []

    def camera():
        for i in range(1000):
            produced.append(i)
            yield render_frame(i, FPS, 32, 48)

    stream = iter_frames(camera(), fps=1.0, source_fps=FPS)
    first = [next(stream) for _ in range(3)]
    assert [f.time for f in first] == [0.0, 1.0, 2.0]
    assert len(produced) == 21  # pulled only up to the third kept frame
    np.testing.assert_array_equal(first[1].image, render_frame(10, FPS, 32, 48))


def test_errors_name_the_parameter(tmp_path):
    with pytest.raises(FileNotFoundError, match="source: video file not found"):
        read_video(tmp_path / "missing.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 10)
    with pytest.raises(ValueError, match="source: cannot open"):
        read_video(tmp_path / "junk.mp4")
    frames = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match=r"source must be uint8.*float32"):
        read_video(frames.astype(np.float32))
    with pytest.raises(ValueError, match=r"source must have shape \[T, H, W, 3\]"):
        read_video(frames[0])
    with pytest.raises(ValueError, match=r"source\[1\] must be uint8"):
        read_video(iter([frames[0], frames[1].astype(np.int16)]))
    with pytest.raises(ValueError, match=r"source\[0\] must have shape \[H, W, 3\]"):
        read_video([frames[0, :, :, :2]])
    with pytest.raises(TypeError, match="source must be a video file path"):
        read_video(42)
    with pytest.raises(ValueError, match="fps must be a finite number > 0"):
        read_video(frames, fps=0)
    with pytest.raises(ValueError, match="source_fps must be a finite number > 0"):
        read_video(frames, source_fps=-1.0)
    with pytest.raises(ValueError, match="max_frames must be an int >= 1"):
        read_video(frames, max_frames=0)
    with pytest.raises(ValueError, match="source frames differ in size"):
        read_video([frames[0], np.zeros((4, 4, 3), np.uint8)])
