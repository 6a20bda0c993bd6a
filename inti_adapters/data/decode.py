"""Video decoding and encoding: PyAV (always available) and torchcodec (used when installed).

Readers are opened on the encoded bytes of one sample, report a frame count, and return the
requested frames as a uint8 tensor ``(N, 3, H, W)``. They never decode past the last frame
asked for.

Real-world files: container metadata that is not UTF-8 (common in HMDB51 ``.avi`` files) is
read with undecodable bytes dropped; a display matrix (phone videos recorded upright) is
applied, so frames come out the way players show them (rotations by multiples of 90 degrees;
the rare mirrored matrices are read as their rotation only); grayscale and odd-sized videos are
converted to RGB like any other.

PyAV frames are returned as a channels-last view ``(N, 3, H, W)`` of the decoder's ``(N, H, W, 3)``
pixels: the antialiased uint8 resize of :mod:`inti_adapters.data.transforms` is several times
faster on that layout, and nothing is copied to planar form before the crop.
"""

from __future__ import annotations

import importlib.util
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch


class VideoDecodeError(RuntimeError):
    """A video could not be opened or decoded (corrupt, truncated, no video stream, zero frames)."""


_TORCHCODEC_ERROR: list[str] = []  # why torchcodec cannot be used (empty: usable or not checked yet)


def torchcodec_available() -> bool:
    """Whether ``torchcodec`` is installed *and* loads (it needs FFmpeg's shared libraries).

    A torchcodec wheel without FFmpeg 4-8 libraries on the system (or built for another torch)
    imports its package but fails when it loads its decoder; such an installation counts as
    unavailable, so that ``decoder='torchcodec'`` is refused at once with the loader's error
    instead of failing on every sample.
    """
    if importlib.util.find_spec("torchcodec") is None:
        return False
    if _TORCHCODEC_ERROR:
        return False
    try:
        import torchcodec
        from torchcodec.decoders import VideoDecoder  # noqa: F401  (torchcodec < 0.9 loads FFmpeg here)

        # torchcodec >= 0.9 imports without FFmpeg and loads it on the first decoder (and then says
        # ffmpeg_major_version = None): its loader, where it has one, runs now to get its error
        utils = "torchcodec._internally_replaced_utils"
        loader = getattr(importlib.import_module(utils), "load_core_libraries", None) \
            if importlib.util.find_spec(utils) else None
        if loader is not None:
            loader()
        elif getattr(torchcodec, "ffmpeg_major_version", 0) is None:
            raise RuntimeError("torchcodec found no FFmpeg shared libraries it can load (ffmpeg_major_version is None)")
    except Exception as exc:  # RuntimeError / OSError / ImportError from the shared libraries
        _TORCHCODEC_ERROR.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return False
    return True


def resolve_decoder(name: str) -> str:
    """Map ``'auto'`` to the decoder that will be used and check the requested one exists."""
    if name == "auto":  # PyAV: always installed, and the path tested on real-world videos (rotation, metadata)
        return "pyav"
    if name == "torchcodec" and not torchcodec_available():
        why = f" ({_TORCHCODEC_ERROR[0]})" if _TORCHCODEC_ERROR else ""
        raise ImportError(f"decoder='torchcodec' was requested but torchcodec is not installed or cannot load{why}; "
                          "install it (pip install torchcodec) with FFmpeg's shared libraries (4 to 8), or use "
                          "decoder='pyav' / 'auto'")
    if name not in ("pyav", "torchcodec"):
        raise ValueError(f"decoder must be 'auto', 'pyav' or 'torchcodec', got {name!r}")
    return name


@dataclass
class VideoInfo:
    """What the shard writer stores in a sample's ``.json`` metadata."""

    num_frames: int
    fps: float
    duration: float
    width: int
    height: int
    codec: str

    def to_dict(self) -> dict[str, Any]:
        return {"num_frames": self.num_frames, "fps": self.fps, "duration": self.duration,
                "size": [self.width, self.height], "codec": self.codec}


class VideoReader(Protocol):
    num_frames: int

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        """uint8 ``(len(indices), 3, H, W)``; indices are in ``[0, num_frames)``, any order, repeats allowed."""


def _open_av(source: bytes | str | Path):
    import av

    try:
        # metadata_errors: titles etc. in latin-1 (HMDB51 .avi files) must not make the video unreadable
        container = av.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source),
                            metadata_errors="ignore")
    except Exception as exc:  # av raises many error types (InvalidDataError, FileNotFoundError, ...)
        raise VideoDecodeError(f"cannot open video: {type(exc).__name__}: {exc}") from exc
    if not container.streams.video:
        container.close()
        raise VideoDecodeError("the file has no video stream")
    return container


def _stream_fps(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def _frame_count_from_header(container, stream) -> int:
    if stream.frames:
        return int(stream.frames)
    fps = _stream_fps(stream)
    if stream.duration is not None and stream.time_base is not None and fps:
        return int(round(float(stream.duration * stream.time_base) * fps))
    if container.duration is not None and fps:
        return int(round(container.duration / 1_000_000 * fps))
    return 0


_REFORMATTER: tuple[int, Any] | None = None  # (pid, VideoReformatter)


def frame_rotation(frame) -> int:
    """Quarter turns (0-3, counter-clockwise) the frame's display matrix asks for."""
    try:
        degrees = frame.rotation
    except Exception:  # no display matrix, or a PyAV without the property
        return 0
    return int(round((degrees or 0) / 90)) % 4


def _to_rgb(frame, width: int | None = None, height: int | None = None) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB, upright, through a cached, single-threaded swscale context.

    ``width`` / ``height`` resize (area filter) in the same pass; they are the decoded frame's
    sizes, before the display rotation. A fresh context per frame is ~10x slower. The cache is
    per process and the context has no worker threads: a context inherited through ``fork``
    (DataLoader workers) would otherwise wait forever for slice threads that only exist in the parent.
    """
    global _REFORMATTER
    if _REFORMATTER is None or _REFORMATTER[0] != os.getpid():
        from av.video.reformatter import VideoReformatter

        _REFORMATTER = (os.getpid(), VideoReformatter())
    resize = width is not None and (width, height) != (frame.width, frame.height)
    rgb = _REFORMATTER[1].reformat(frame, width=width, height=height, format="rgb24", threads=1,
                                   interpolation="AREA" if resize else None).to_ndarray()
    turns = frame_rotation(frame)
    return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb


class PyAVReader:
    """Sequential PyAV decoding that keeps only the frames asked for (one pass, stops at the last index)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._decoded: list[np.ndarray] | None = None
        self._container = None
        self._container = _open_av(data)  # kept open for the first get_frames
        self.num_frames = _frame_count_from_header(self._container, self._container.streams.video[0])
        if self.num_frames <= 0:  # no usable header: decode everything once (only odd containers)
            with self._take_container() as container:
                self._decoded = self._decode(container, None)
            self.num_frames = len(self._decoded)
        if self.num_frames <= 0:
            raise VideoDecodeError("the video has no decodable frames")

    def _take_container(self):
        container, self._container = self._container, None
        return container if container is not None else _open_av(self._data)

    def close(self) -> None:
        """Release the demuxer (also done by the first ``get_frames``)."""
        if self._container is not None:
            self._container.close()
            self._container = None

    def __del__(self) -> None:
        self.close()

    @staticmethod
    def _decode(container, wanted: set[int] | None, last_needed: int | None = None) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        position = -1
        try:
            for position, frame in enumerate(container.decode(video=0)):
                out.append(_to_rgb(frame) if wanted is None or position in wanted else None)
                if last_needed is not None and position >= last_needed:
                    break
        except Exception as exc:
            raise VideoDecodeError(f"decoding failed at frame {position + 1}: {type(exc).__name__}: {exc}") from exc
        return out

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        indices = [int(i) for i in indices]
        if not indices:
            raise ValueError("get_frames needs at least one frame index")
        if min(indices) < 0:
            raise ValueError(f"frame indices must be >= 0, got {min(indices)}")
        frames = self._decoded
        if frames is None:
            wanted = set(indices)
            with self._take_container() as container:
                frames = self._decode(container, wanted, max(indices))
            if frames and frames[-1] is None:  # the stream ended early: keep its last frame for the tail
                with self._take_container() as container:
                    frames = self._decode(container, wanted | {len(frames) - 1}, max(indices))
        if not frames:
            raise VideoDecodeError("the video has no decodable frames")
        # indices past the real end (a header that over-counts, e.g. a truncated file) repeat the last frame
        out = [frames[i] if i < len(frames) else frames[-1] for i in indices]
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)  # channels-last view, see the module doc


class TorchCodecReader:
    """torchcodec's ``VideoDecoder`` (exact frame access by index)."""

    def __init__(self, data: bytes) -> None:
        from torchcodec.decoders import VideoDecoder

        try:
            self._decoder = VideoDecoder(data)
            self.num_frames = int(self._decoder.metadata.num_frames or 0)
        except Exception as exc:
            raise VideoDecodeError(f"cannot open video: {type(exc).__name__}: {exc}") from exc
        if self.num_frames <= 0:
            raise VideoDecodeError("the video has no decodable frames")

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        try:
            batch = self._decoder.get_frames_at(indices=[int(i) for i in indices])
        except Exception as exc:
            raise VideoDecodeError(f"decoding failed: {type(exc).__name__}: {exc}") from exc
        return batch.data.contiguous()


def open_video(data: bytes, decoder: str = "pyav") -> VideoReader:
    """A reader for the encoded bytes of one video. ``decoder``: 'pyav', 'torchcodec' or 'auto'."""
    name = resolve_decoder(decoder)
    if name == "torchcodec":
        return TorchCodecReader(data)
    return PyAVReader(data)


def probe_video(source: bytes | str | Path, *, full: bool = False) -> VideoInfo:
    """Open a video, decode its first frame (every frame when ``full``) and describe it.

    Raises:
        VideoDecodeError: the video cannot be opened or has no decodable frame.
    """
    try:
        with _open_av(source) as container:
            stream = container.streams.video[0]
            fps = _stream_fps(stream)
            header_frames = _frame_count_from_header(container, stream)
            decoded = 0
            for frame in container.decode(video=0):
                width, height = frame.width, frame.height
                if frame_rotation(frame) % 2:
                    width, height = height, width  # the size players show
                decoded += 1
                if not full:
                    break
            if decoded == 0:
                raise VideoDecodeError("the video has no decodable frames")
            num_frames = decoded if full else (header_frames or decoded)
            duration = (container.duration / 1_000_000) if container.duration else (num_frames / fps if fps else 0.0)
            return VideoInfo(num_frames=num_frames, fps=fps, duration=float(duration), width=width,
                             height=height, codec=stream.codec_context.name)
    except VideoDecodeError:
        raise
    except Exception as exc:
        raise VideoDecodeError(f"{type(exc).__name__}: {exc}") from exc


def _x264_options(codec: str, crf: int, preset: str) -> dict[str, str]:
    """Encoder options. x264's macroblock-tree rate control gives run-to-run different bytes for the
    same input (measured with PyAV 18 / x264 core 165 on short clips), so it is off: re-running a
    writer gives byte-identical shards."""
    if codec in ("libx264", "h264"):
        return {"crf": str(crf), "preset": preset, "x264-params": "mbtree=0"}
    if codec == "libx265":
        return {"crf": str(crf), "preset": preset}
    return {}


def _even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


def encode_video(
    frames: np.ndarray | torch.Tensor,
    fps: float = 8.0,
    *,
    codec: str = "libx264",
    crf: int = 4,
    preset: str = "veryfast",
) -> bytes:
    """Encode uint8 RGB frames ``(T, H, W, 3)`` as an MP4 (yuv420p; H and W must be even).

    ``crf`` near 0 is near-lossless; the built-in data set uses 4 so that 8x8 digit scans
    upscaled to a few dozen pixels survive.
    """
    if isinstance(frames, torch.Tensor):
        frames = frames.numpy()
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even frame sizes, got {height}x{width}")
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.thread_count = 1
        stream.options = _x264_options(codec, crf, preset)
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _encoded_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """Even ``(w, h)`` of a re-encoded video, the short side brought to ``short_side`` when given."""
    if short_side is None:
        return _even(width), _even(height)
    s = short_side / min(width, height)
    return _even(width * s), _even(height * s)


def _add_stream(out: Any, frame: Any, short_side: int | None, fps: float, codec: str, crf: int, preset: str) -> Any:
    """The output video stream, sized from the first frame."""
    w, h = _encoded_size(frame.width, frame.height, short_side)
    stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
    stream.thread_count = 1  # parallelism comes from the writer's processes
    stream.options = _x264_options(codec, crf, preset)
    return stream


def reencode_video(
    path: str | Path | bytes,
    *,
    short_side: int | None = None,
    fps: float | None = None,
    codec: str = "libx264",
    crf: int = 18,
    preset: str = "veryfast",
) -> tuple[bytes, VideoInfo]:
    """Decode a video file and encode it again as MP4, optionally resized (short side) and resampled in time.

    Frames are streamed (never all held in memory). Returns the bytes and the new video's info.

    Raises:
        VideoDecodeError: the input cannot be decoded or has no frame.
    """
    import av

    buf = io.BytesIO()
    written = 0
    try:
        with _open_av(path) as src, av.open(buf, "w", format="mp4") as out:
            in_fps = _stream_fps(src.streams.video[0]) or 25.0
            out_fps = fps or in_fps
            stream, last, n_in = None, None, 0

            def emit(frame) -> None:
                nonlocal written
                img = frame.reformat(width=stream.width, height=stream.height, format="yuv420p")
                img.pts, img.time_base = written, 1 / stream.codec_context.framerate  # constant frame rate
                for packet in stream.encode(img):
                    out.mux(packet)
                written += 1

            for frame in src.decode(video=0):
                if frame_rotation(frame):  # a phone video: store it upright (the display matrix is not copied)
                    frame = av.VideoFrame.from_ndarray(_to_rgb(frame), format="rgb24")
                if stream is None:
                    stream = _add_stream(out, frame, short_side, out_fps, codec, crf, preset)
                t, n_in, last = n_in / in_fps, n_in + 1, frame
                if fps is None:
                    emit(frame)
                    continue
                while written / out_fps <= t + 1e-9:  # new frame rate: the latest input frame at each output time
                    emit(frame)
            if stream is None:
                raise VideoDecodeError("the video has no decodable frames")
            while fps is not None and written / out_fps < n_in / in_fps - 1e-9:  # fill up to the input's duration
                emit(last)
            for packet in stream.encode():
                out.mux(packet)
    except VideoDecodeError:
        raise
    except Exception as exc:
        raise VideoDecodeError(f"re-encoding failed: {type(exc).__name__}: {exc}") from exc
    data = buf.getvalue()
    info = probe_video(data)
    info.num_frames = written
    return data, info
