"""Videos as they come in real data sets: non-UTF-8 metadata, 1 frame, grayscale, odd sizes,
phone videos with a display matrix, and torchcodec against PyAV on the same clips."""

from __future__ import annotations

import io
import json
import tarfile

import av
import numpy as np
import pytest
import torch

from inti_adapters.data import build_dataloader, open_video, probe_video, write_shards
from inti_adapters.data.decode import torchcodec_available
from inti_adapters.data.frames import FrameReader


def _encode(frames: np.ndarray, *, fmt: str = "mp4", codec: str = "libx264", pix_fmt: str = "yuv420p",
            rotation: int | None = None, title: str | None = None) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream(codec, rate=8)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        if rotation is not None:
            s.set_display_rotation(rotation)
        if title is not None:
            c.metadata["title"] = title
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def _marked(t: int, h: int, w: int) -> np.ndarray:
    """Grey frames brightening over time with a white block in the top-left corner."""
    frames = np.repeat((40 + 10 * np.arange(t, dtype=np.uint8))[:, None, None, None], 3, 3)
    frames = np.broadcast_to(frames, (t, h, w, 3)).copy()
    frames[:, : h // 3, : w // 3] = 255
    return frames


def latin1_avi() -> bytes:
    """An AVI whose title is latin-1 bytes, not UTF-8 (as in many HMDB51 files)."""
    data = _encode(_marked(4, 24, 32), fmt="avi", codec="mpeg4", title="ZZZZZZZZ")
    i = data.find(b"ZZZZZZZZ")
    return data[:i] + "Pélé Ça".encode("latin-1") + b"\xe9" + data[i + 8:]


@pytest.fixture(scope="module")
def odd_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    files = {
        "hmdb/latin1.avi": latin1_avi(),
        "one/one_frame.mp4": _encode(_marked(1, 24, 32)),
        "gray/gray.mkv": _encode(_marked(5, 24, 32), fmt="matroska", codec="ffv1", pix_fmt="gray"),
        "odd/odd_size.avi": _encode(_marked(6, 23, 37), fmt="avi", codec="mpeg4"),
        "phone/rotated.mp4": _encode(_marked(5, 24, 40), rotation=90),
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_non_utf8_metadata_is_read_not_skipped():
    data = latin1_avi()
    with pytest.raises(UnicodeDecodeError):  # what PyAV does by default: the reason videos were skipped
        av.open(io.BytesIO(data)).close()
    assert probe_video(data).num_frames == 4 and open_video(data).get_frames([3]).shape == (1, 3, 24, 32)


def test_rotated_phone_video_comes_out_upright():
    data = _encode(_marked(3, 24, 40), rotation=90)
    info = probe_video(data)
    assert (info.width, info.height) == (24, 40)  # the size players show
    frame = open_video(data).get_frames([0])[0, 0]
    assert frame.shape == (40, 24)
    # a 90-degree counter-clockwise display rotation moves the top-left block to the bottom-left
    assert frame[-5:, :4].float().mean() > 200 and frame[:5, :4].float().mean() < 150


@pytest.mark.parametrize("store", ["video", "frames"])
def test_odd_videos_are_written_and_read(odd_tree, tmp_path, store):
    extra = {"store": "frames", "frames_per_video": 4} if store == "frames" else {}
    summary = write_shards(source=str(odd_tree), output=str(tmp_path / store), samples_per_shard=10,
                           progress=False, **extra)
    assert summary.skipped == 0 and summary.written == 5, summary.skipped_videos
    with tarfile.open(summary.shards[0]) as tar:
        metas = {json.loads(tar.extractfile(m).read())["source"]: json.loads(tar.extractfile(m).read())
                 for m in tar.getmembers() if m.name.endswith(".json")}
    assert metas["phone/rotated.mp4"]["size"] == [24, 40] and metas["one/one_frame.mp4"]["num_frames"] == 1
    if store == "frames":
        assert metas["one/one_frame.mp4"]["frame_indices"] == [0]  # fewer frames than frames_per_video
        assert metas["gray/gray.mkv"]["frame_indices"] == [0, 1, 3, 4]  # 5 frames -> 4 segment centres
    cfg_kw = dict(num_frames=4, crop_size=16, short_side=16, batch_size=5, num_clips=2)
    from inti_adapters.data import DataConfig

    cfg = DataConfig(train_shards=summary.shards, val_shards=summary.shards, **cfg_kw)
    (video, labels), = list(build_dataloader(cfg, train=False))
    assert video.shape == (5, 2, 3, 4, 16, 16) and sorted(labels.tolist()) == list(range(5))
    assert video.float().std(dim=(1, 2, 3, 4, 5)).min() > 5  # no blank clip
    (train, _), = list(build_dataloader(cfg.replace(shuffle_buffer=0), train=True))
    assert train.shape == (5, 3, 4, 16, 16)


def test_rotated_frames_in_frame_shards(odd_tree, tmp_path):
    summary = write_shards(source=str(odd_tree / "phone").rsplit("/", 1)[0], output=str(tmp_path / "f"),
                           store="frames", progress=False)
    with tarfile.open(summary.shards[0]) as tar:
        samples: dict[str, dict] = {}
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    (rotated,) = [s for s in samples.values() if json.loads(s["json"])["source"] == "phone/rotated.mp4"]
    frame = FrameReader(rotated).get_frames([0])[0, 0]
    assert frame.shape == (40, 24) and frame[-5:, :4].float().mean() > 200


@pytest.mark.skipif(not torchcodec_available(), reason="torchcodec is not installed or cannot load FFmpeg")
def test_torchcodec_matches_pyav(odd_tree):  # pragma: no cover - needs torchcodec + FFmpeg libraries
    clips = [(odd_tree / "odd/odd_size.avi").read_bytes(), _encode(_marked(9, 24, 32)),
             (odd_tree / "gray/gray.mkv").read_bytes()]
    for data in clips:
        a, b = open_video(data, "pyav"), open_video(data, "torchcodec")
        assert a.num_frames == b.num_frames
        idx = [0, a.num_frames - 1, a.num_frames // 2]
        fa, fb = a.get_frames(idx), b.get_frames(idx)
        assert fa.shape == fb.shape and (fa.float() - fb.float()).abs().mean() < 3
    rotated = _encode(_marked(3, 24, 40), rotation=90)
    assert open_video(rotated, "torchcodec").get_frames([0]).shape == (1, 3, 40, 24)
    assert isinstance(open_video(rotated, "torchcodec").get_frames([0]), torch.Tensor)
