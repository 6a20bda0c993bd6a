"""Which frames of a video make a clip: uniform segment sampling and dense strided sampling.

All functions return sorted (non-decreasing) int64 indices in ``[0, num_video_frames)``,
exactly ``num_frames`` of them. ``rng=None`` selects the deterministic test-time position.

- **uniform** (TSN / Something-Something): the video is cut into ``num_frames`` equal segments
  and one frame is taken from each (a random one in training, the centre in testing; test clip
  ``c`` of ``n`` takes the point ``(c + 0.5) / n`` of each segment). The clip always spans the
  whole video; a video with fewer frames than ``num_frames`` repeats frames.
- **dense** (Kinetics): ``num_frames`` frames ``stride`` apart, starting at a random point in
  training; test clips start at evenly spaced points. A video shorter than the clip span
  ``(num_frames - 1) * stride + 1`` falls back to uniform sampling over its whole length.
"""

from __future__ import annotations

import numpy as np

from .config import SAMPLING_MODES


def _check(num_video_frames: int, num_frames: int, clip_index: int, num_clips: int) -> None:
    if num_video_frames < 1:
        raise ValueError(f"the video has {num_video_frames} frames; at least 1 is needed")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if num_clips < 1 or not 0 <= clip_index < num_clips:
        raise ValueError(f"clip_index must be in [0, num_clips={num_clips}), got {clip_index}")


def uniform_indices(
    num_video_frames: int,
    num_frames: int,
    *,
    rng: np.random.Generator | None = None,
    clip_index: int = 0,
    num_clips: int = 1,
) -> np.ndarray:
    """One frame per equal segment (random within the segment when ``rng`` is given)."""
    _check(num_video_frames, num_frames, clip_index, num_clips)
    seg = num_video_frames / num_frames
    if rng is None:
        offsets = np.full(num_frames, (clip_index + 0.5) / num_clips)
    else:
        offsets = rng.random(num_frames)
    idx = np.floor((np.arange(num_frames) + offsets) * seg).astype(np.int64)
    return np.clip(idx, 0, num_video_frames - 1)


def dense_indices(
    num_video_frames: int,
    num_frames: int,
    stride: int,
    *,
    rng: np.random.Generator | None = None,
    clip_index: int = 0,
    num_clips: int = 1,
) -> np.ndarray:
    """``num_frames`` frames ``stride`` apart (uniform fallback for videos shorter than the span)."""
    _check(num_video_frames, num_frames, clip_index, num_clips)
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    span = (num_frames - 1) * stride + 1
    if num_video_frames < span:
        return uniform_indices(num_video_frames, num_frames, rng=rng, clip_index=clip_index, num_clips=num_clips)
    room = num_video_frames - span  # last valid start
    if rng is not None:
        start = int(rng.integers(0, room + 1))
    elif num_clips == 1:
        start = room // 2
    else:
        start = int(round(clip_index * room / (num_clips - 1)))
    return start + np.arange(num_frames, dtype=np.int64) * stride


def sample_indices(
    mode: str,
    num_video_frames: int,
    num_frames: int,
    *,
    stride: int = 1,
    rng: np.random.Generator | None = None,
    clip_index: int = 0,
    num_clips: int = 1,
) -> np.ndarray:
    """Dispatch on ``mode`` ('uniform' or 'dense')."""
    if mode == "uniform":
        return uniform_indices(num_video_frames, num_frames, rng=rng, clip_index=clip_index, num_clips=num_clips)
    if mode == "dense":
        return dense_indices(num_video_frames, num_frames, stride, rng=rng, clip_index=clip_index,
                             num_clips=num_clips)
    raise ValueError(f"sampling mode must be one of {list(SAMPLING_MODES)}, got {mode!r}")


def test_clip_indices(mode: str, num_video_frames: int, num_frames: int, num_clips: int,
                      *, stride: int = 1) -> list[np.ndarray]:
    """The ``num_clips`` deterministic clips of multi-view testing."""
    return [sample_indices(mode, num_video_frames, num_frames, stride=stride, clip_index=c, num_clips=num_clips)
            for c in range(num_clips)]


test_clip_indices.__test__ = False  # type: ignore[attr-defined]  # not a pytest test when imported
