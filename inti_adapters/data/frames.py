"""Frame shards: each video stored as a fixed number of JPEG frames (``inti-shards --store frames``).

Decoding whole H.264 videos gives a few training clips per second per CPU core; a GPU consumes
hundreds. A frame shard decodes each video once, when it is written, and keeps
``frames_per_video`` frames resized to a short side, as JPEG, so that reading a clip is a batch
of small JPEG decodes (on the CPU, or on the GPU with ``DataConfig.decode_device='cuda'``).

One sample::

    <key>.00000.jpg ... <key>.00031.jpg   the stored frames, in time order
    <key>.cls                             the label
    <key>.json                            {"store": "frames", "num_frames": N, "fps", "duration",
                                           "frame_indices": [original index of each stored frame],
                                           "frame_crc32": [...], "size": [w, h], "source_size": [w, h], ...}

**Which frames are stored.** ``frames_per_video = K`` keeps, of a video of ``N`` frames, the
centre frame of each of ``K`` equal segments: original index ``floor((k + 0.5) * N / K)``; with
``K = 0`` or ``K >= N`` every frame is kept.

**How a clip is sampled.** Exactly as from the video: uniform-segment or dense indices are
computed on the *original* time axis ``0 .. N-1`` (so a recipe means the same on both kinds of
shard), then each index takes the stored frame whose original index is nearest (ties: the
earlier). What ``K`` allows:

- uniform sampling of ``T`` frames: every clip frame is a different stored frame when
  ``K >= T``; training draws among about ``K / T`` stored frames per segment (K = 32, T = 16:
  2 choices; K = 2T is a good default). Test clips (segment centres) land on stored frames.
- dense sampling (``T`` frames ``stride`` apart): the clip spans ``(T - 1) * stride + 1``
  original frames, which hold about that many times ``K / N`` stored frames. Distinct frames
  need ``K >= N / stride``: store every frame (``K = 0``) or enough of them for dense recipes.
- fewer stored frames than the clip needs repeat frames, as a short video does.

Corruption. Each member's CRC-32 is in the JSON and checked before decoding (a flipped byte in a
JPEG otherwise decodes to garbage with only a libjpeg warning); a member that is missing, fails
its check or does not decode makes the sample undecodable: the reader skips and counts it like a
corrupt video.
"""

from __future__ import annotations

import json
import re
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.io import ImageReadMode
from torchvision.io import decode_jpeg as _tv_decode_jpeg
from torchvision.io import encode_jpeg as _tv_encode_jpeg

from .decode import VideoDecodeError, _frame_count_from_header, _open_av, _stream_fps, _to_rgb, frame_rotation
from .transforms import short_side_size


def encode_jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    """``torchvision.io.encode_jpeg`` without its deprecation warning (torchvision 0.29 points to
    torchcodec's image codecs; the API is the same and stays available)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return _tv_encode_jpeg(image, quality=quality)


def decode_jpeg(data: list[torch.Tensor], *, mode: ImageReadMode, device: str | torch.device) -> list[torch.Tensor]:
    """``torchvision.io.decode_jpeg`` (batched; nvJPEG on a CUDA device) without its deprecation warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return _tv_decode_jpeg(data, mode=mode, device=device)


FRAME_MEMBER = re.compile(r"^(\d+)\.jpg$")
STORE_KIND = "frames"


def frame_member(position: int) -> str:
    """The member extension of stored frame ``position`` (``'00007.jpg'``)."""
    return f"{position:05d}.jpg"


def frame_members(sample: dict[str, Any]) -> list[str]:
    """The JPEG frame members of a sample, in time order (empty for a video sample)."""
    found = [(int(m.group(1)), k) for k in sample if isinstance(k, str) and (m := FRAME_MEMBER.match(k))]
    return [k for _, k in sorted(found)]


def stored_frame_indices(num_frames: int, frames_per_video: int) -> np.ndarray:
    """Original indices of the frames a frame shard keeps (see the module docstring)."""
    if num_frames < 1:
        raise ValueError(f"the video has {num_frames} frames; at least 1 is needed")
    if frames_per_video < 0:
        raise ValueError(f"frames_per_video must be >= 0, got {frames_per_video}")
    if frames_per_video == 0 or frames_per_video >= num_frames:
        return np.arange(num_frames, dtype=np.int64)
    k = np.arange(frames_per_video)
    return np.floor((k + 0.5) * num_frames / frames_per_video).astype(np.int64)


def nearest_stored(indices: Sequence[int] | np.ndarray, stored: Sequence[int] | np.ndarray) -> np.ndarray:
    """Positions (into ``stored``) of the stored frame nearest to each original index; ties take the earlier."""
    stored = np.asarray(stored, dtype=np.int64)
    idx = np.asarray(indices, dtype=np.int64)
    right = np.searchsorted(stored, idx, side="left").clip(0, len(stored) - 1)
    left = (right - 1).clip(0)
    take_left = np.abs(idx - stored[left]) <= np.abs(stored[right] - idx)
    return np.where(take_left, left, right)


# ---------------------------------------------------------------------------------------------------
# writing (one video -> JPEG members)


def _target_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """``(w, h)`` of a stored frame: the short side brought down to ``short_side`` (never up)."""
    if short_side is None or min(width, height) <= short_side:
        return width, height
    h, w = short_side_size(height, width, short_side)
    return w, h


def _decode_pass(source: bytes | str | Path, wanted: set[int] | None, short_side: int | None,
                 quality: int) -> tuple[dict[int, bytes], int, tuple[int, int], tuple[int, int]]:
    """Decode every frame; JPEG-encode those in ``wanted`` (all when None).

    Returns ``(jpegs by original index, frame count, stored (w, h), upright source (w, h))``.
    """
    kept: dict[int, bytes] = {}
    count, size, source_size = 0, (0, 0), (0, 0)
    with _open_av(source) as container:
        try:
            for count, frame in enumerate(container.decode(video=0), start=1):
                if count == 1:
                    quarter = frame_rotation(frame) % 2
                    source_size = (frame.height, frame.width) if quarter else (frame.width, frame.height)
                    size = _target_size(*source_size, short_side)
                if wanted is not None and count - 1 not in wanted:
                    continue
                decoded_size = (size[1], size[0]) if quarter else size  # swscale works before the rotation
                rgb = torch.from_numpy(_to_rgb(frame, *decoded_size))
                kept[count - 1] = encode_jpeg(rgb.permute(2, 0, 1).contiguous(), quality=quality).numpy().tobytes()
        except VideoDecodeError:
            raise
        except Exception as exc:
            raise VideoDecodeError(f"decoding failed at frame {count + 1}: {type(exc).__name__}: {exc}") from exc
    if count == 0:
        raise VideoDecodeError("the video has no decodable frames")
    return kept, count, size, source_size


def extract_frames(
    source: bytes | str | Path,
    *,
    frames_per_video: int = 32,
    short_side: int | None = 256,
    quality: int = 90,
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Decode a video once and keep ``frames_per_video`` frames as JPEG (see the module docstring).

    Returns ``(members, info)``: ``{'00000.jpg': bytes, ...}`` and the JSON metadata of the sample
    (without label fields). The frame count comes from the container header and is checked by
    decoding; a header that is wrong (truncated files, some WebM/AVI files) costs a second pass.

    Raises:
        VideoDecodeError: the video cannot be opened or has no decodable frame.
    """
    with _open_av(source) as container:
        stream = container.streams.video[0]
        header = _frame_count_from_header(container, stream)
        fps = _stream_fps(stream)
        codec = stream.codec_context.name
        duration = container.duration / 1_000_000 if container.duration else None
    wanted = None if frames_per_video == 0 else set(stored_frame_indices(max(header, 1), frames_per_video).tolist())
    kept, count, size, source_size = _decode_pass(source, wanted, short_side, quality)
    stored = stored_frame_indices(count, frames_per_video)
    if not set(stored.tolist()) <= set(kept):  # the header miscounted: now the count is known
        kept, count, size, source_size = _decode_pass(source, set(stored.tolist()), short_side, quality)
    jpegs = [kept[int(i)] for i in stored]
    info = {
        "store": STORE_KIND, "num_frames": count, "fps": fps,
        "duration": float(duration if duration else (count / fps if fps else 0.0)),
        "frame_indices": stored.tolist(), "frame_crc32": [zlib.crc32(j) for j in jpegs],
        "size": list(size), "source_size": list(source_size), "codec": codec, "jpeg_quality": quality,
    }
    return {frame_member(p): j for p, j in enumerate(jpegs)}, info


def encode_frames(frames: np.ndarray, *, fps: float, quality: int = 90) -> tuple[dict[str, bytes], dict[str, Any]]:
    """A frame-shard sample of uint8 RGB frames ``(T, H, W, 3)`` that are already decoded (every frame kept).

    Returns ``(members, info)`` as :func:`extract_frames` does.
    """
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    jpegs = [encode_jpeg(torch.from_numpy(np.ascontiguousarray(f)).permute(2, 0, 1).contiguous(),
                         quality=quality).numpy().tobytes() for f in frames]
    t, h, w = frames.shape[:3]
    info = {"store": STORE_KIND, "num_frames": t, "fps": float(fps), "duration": t / fps,
            "frame_indices": list(range(t)), "frame_crc32": [zlib.crc32(j) for j in jpegs], "size": [w, h],
            "source_size": [w, h], "codec": "rawvideo", "jpeg_quality": quality}
    return {frame_member(p): j for p, j in enumerate(jpegs)}, info


# ---------------------------------------------------------------------------------------------------
# reading (one sample -> frames)


def jpeg_size(data: bytes) -> tuple[int, int]:
    """``(height, width)`` from a JPEG's frame header (no decoding).

    Raises:
        VideoDecodeError: not a JPEG, or no frame header.
    """
    if data[:2] != b"\xff\xd8":
        raise VideoDecodeError("not a JPEG (no start-of-image marker)")
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            raise VideoDecodeError(f"damaged JPEG header at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
            return int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
        i += 2 + length
    raise VideoDecodeError("JPEG without a frame header")


class FrameReader:
    """A frame-shard sample read like a video: ``num_frames`` is the *original* count and
    :meth:`get_frames` takes original indices (mapped to the nearest stored frames)."""

    def __init__(self, sample: dict[str, Any]) -> None:
        self._sample = sample
        self.members = frame_members(sample)
        if not self.members:
            raise VideoDecodeError("the sample has no JPEG frame members")
        meta = json.loads(sample["json"]) if "json" in sample else {}
        stored = meta.get("frame_indices") or list(range(len(self.members)))
        if len(stored) != len(self.members):
            raise VideoDecodeError(f"the sample's JSON lists {len(stored)} stored frames but it holds "
                                   f"{len(self.members)} JPEG members (a member is missing or extra)")
        self.stored = np.asarray(stored, dtype=np.int64)
        if np.any(np.diff(self.stored) <= 0) or self.stored[0] < 0:
            raise VideoDecodeError("frame_indices in the sample's JSON are not increasing")
        self.num_frames = max(int(meta.get("num_frames") or 0), int(self.stored[-1]) + 1)
        self._crc = meta.get("frame_crc32")

    def positions(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Stored-frame positions for original frame indices."""
        return nearest_stored(indices, self.stored)

    def encoded(self, position: int) -> bytes:
        """The JPEG bytes of stored frame ``position``, checked against the CRC-32 in the JSON."""
        data = self._sample[self.members[position]]
        if self._crc is not None and zlib.crc32(data) != int(self._crc[position]):
            raise VideoDecodeError(f"frame member {self.members[position]} is corrupt (CRC-32 mismatch)")
        if data[:2] != b"\xff\xd8" or b"\xff\xd9" not in data[-16:]:
            raise VideoDecodeError(f"frame member {self.members[position]} is not a complete JPEG")
        return data

    def frame_size(self, positions: Sequence[int] = (0,)) -> tuple[int, int]:
        """``(height, width)`` of the stored frames, read from the JPEG headers of ``positions``
        (checked, like their CRC-32, so that a GPU decoder never meets a damaged frame).

        Raises:
            VideoDecodeError: a frame is damaged or the frames differ in size.
        """
        sizes = {jpeg_size(self.encoded(int(p))) for p in positions}
        if len(sizes) != 1:
            raise VideoDecodeError(f"the frames of one video differ in size: {sorted(sizes)}")
        return sizes.pop()

    def get_frames(self, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """uint8 ``(len(indices), 3, H, W)`` (a channels-last view), decoding each needed stored frame once."""
        positions = self.positions(indices)
        unique, inverse = np.unique(positions, return_inverse=True)
        images = decode_jpegs([self.encoded(int(p)) for p in unique], what=f"{len(unique)} frames of the sample")
        hwc = torch.stack([images[i].permute(1, 2, 0) for i in inverse.reshape(-1)])  # one copy, repeats included
        return hwc.permute(0, 3, 1, 2)


def decode_jpegs(data: Sequence[bytes | torch.Tensor], *, device: str | torch.device = "cpu", what: str = "frames",
                 same_size: bool = True) -> list[torch.Tensor]:
    """Batched ``torchvision.io.decode_jpeg`` of encoded frames (bytes, or uint8 CPU tensors) to RGB
    ``(3, H, W)`` uint8 tensors on ``device``.

    With ``same_size`` all frames must have one size. Raises :class:`VideoDecodeError` on any failure.
    """
    tensors = [d if isinstance(d, torch.Tensor) else torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    try:
        images = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
    except Exception as exc:
        raise VideoDecodeError(f"JPEG decoding of {what} failed: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[-1] if str(exc) else ''}") from exc
    if same_size and len({tuple(img.shape) for img in images}) > 1:
        raise VideoDecodeError(f"the frames of one video differ in size: {sorted({tuple(i.shape) for i in images})}")
    return images
