"""Frame shards: writing (from videos and from video shards), the original-time mapping, reading
them like video shards, GPU-style decoding on CPU tensors, and corrupt JPEG members."""

from __future__ import annotations

import json
import logging
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_tar_samples

from inti_adapters.data import DataConfig, build_dataloader, encode_video, write_shards
from inti_adapters.data import shards as shards_mod
from inti_adapters.data.device import EncodedBatch, decode_batch
from inti_adapters.data.frames import FrameReader, extract_frames, nearest_stored, stored_frame_indices

SIZE = 32


def _ramp_video(n: int, seed: int = 0, h: int = SIZE, w: int = SIZE + 8) -> np.ndarray:
    """Frame i has brightness about 8 * i (+ a fixed texture): the clip tells which frames were taken."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 40, (1, h, w, 3))
    return np.clip(base + 8 * np.arange(n).reshape(-1, 1, 1, 1), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    for c in range(3):
        (root / f"class{c}").mkdir()
        for i in range(4):
            n = 5 + 3 * i + c
            (root / f"class{c}" / f"v{i}.mp4").write_bytes(encode_video(_ramp_video(n, seed=c * 10 + i), 10, crf=4))
    return root


@pytest.fixture
def pretend_gpu(monkeypatch):
    """decode_device='cuda' is refused without a GPU; these tests run the device path on CPU tensors."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_decode_device_cuda_without_a_gpu_is_refused_when_the_config_is_read(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="decode_device is 'cuda' but torch finds no CUDA GPU.*set decode_device: cpu"):
        DataConfig(decode_device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"'cuda:2' but this machine has 2 CUDA GPU\(s\)"):
        DataConfig(decode_device="cuda:2")
    assert DataConfig(decode_device="cuda:1").decode_device == "cuda:1"


def test_stored_frames_and_mapping():
    np.testing.assert_array_equal(stored_frame_indices(100, 4), [12, 37, 62, 87])  # segment centres
    np.testing.assert_array_equal(stored_frame_indices(5, 8), np.arange(5))  # fewer frames: all of them
    np.testing.assert_array_equal(stored_frame_indices(7, 0), np.arange(7))  # 0 = every frame
    stored = [12, 37, 62, 87]
    np.testing.assert_array_equal(nearest_stored([0, 24, 25, 49, 50, 99], stored), [0, 0, 1, 1, 2, 3])
    assert nearest_stored([24], [12, 36])[0] == 0  # tie: the earlier one


@pytest.mark.parametrize("frames_per_video", [0, 4, 8])
def test_extract_frames_maps_to_the_right_original_frames(frames_per_video):
    video = _ramp_video(20)
    members, info = extract_frames(encode_video(video, 10, crf=0), frames_per_video=frames_per_video,
                                   short_side=16, quality=95)
    stored = stored_frame_indices(20, frames_per_video)
    assert info["frame_indices"] == stored.tolist() and info["num_frames"] == 20 and info["fps"] == 10
    assert len(members) == len(stored) and info["size"] == [20, 16] and info["source_size"] == [40, 32]
    reader = FrameReader({**members, "json": json.dumps(info).encode()})
    assert reader.num_frames == 20
    wanted = np.array([0, 3, 9, 10, 19])
    frames = reader.get_frames(wanted)
    assert frames.shape == (5, 3, 16, 20)
    expected = stored[nearest_stored(wanted, stored)]  # the original frame each index maps to
    brightness = frames.float().mean(dim=(1, 2, 3)).numpy()
    reference = video[expected].astype(np.float32).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(brightness, reference, atol=3)


def _cfg(shards, **kw) -> DataConfig:
    base = dict(train_shards=shards, val_shards=shards, num_frames=4, crop_size=SIZE, short_side=SIZE,
                batch_size=4, shuffle_buffer=8, seed=0, scale=(0.5, 1.0))
    base.update(kw)
    return DataConfig(**base)


def test_write_and_read_frame_shards(tree, tmp_path, capsys):
    summary = write_shards(source=str(tree), output=str(tmp_path / "f"), samples_per_shard=5, store="frames",
                           frames_per_video=6, short_side=SIZE, progress=False)
    assert (summary.written, summary.skipped, len(summary.shards), summary.store) == (12, 0, 3, "frames")
    assert "kB per video, frames" in str(summary)
    samples = read_tar_samples(summary.shards)
    for s in samples:
        meta = json.loads(s["json"])
        jpgs = sorted(k for k in s if k.endswith(".jpg"))
        assert jpgs == [f"{i:05d}.jpg" for i in range(min(6, meta["num_frames"]))]
        assert meta["store"] == "frames" and len(meta["frame_crc32"]) == len(jpgs)
        assert int(s["cls"]) == meta["label"] and meta["class_name"] == f"class{meta['label']}"
    cfg = _cfg(summary.shards, num_clips=2, num_crops=3, eval_batch_size=5)
    batches = list(build_dataloader(cfg, train=True))
    assert len(batches) == 3 and all(v.shape == (4, 3, 4, SIZE, SIZE) and v.dtype == torch.uint8 for v, _ in batches)
    ev = build_dataloader(cfg.replace(num_workers=2), train=False)
    labels = Counter(int(x) for v, y in ev for x in y)
    assert labels == Counter({0: 4, 1: 4, 2: 4})  # every sample exactly once
    assert ev.read_report.read == ev.read_report.expected == 12
    # the same frames read from a DataLoader worker pool and in this process
    assert [v.shape for v, _ in ev] == [(5, 6, 3, 4, SIZE, SIZE), (5, 6, 3, 4, SIZE, SIZE), (2, 6, 3, 4, SIZE, SIZE)]


def test_frame_and_video_shards_give_the_same_clips(tree, tmp_path):
    video = write_shards(source=str(tree), output=str(tmp_path / "v"), samples_per_shard=12, progress=False)
    frames = write_shards(source=str(tree), output=str(tmp_path / "f"), samples_per_shard=12, store="frames",
                          frames_per_video=0, short_side=SIZE, jpeg_quality=95, progress=False)
    for train in (True, False):
        a = list(build_dataloader(_cfg(video.shards, num_clips=2), train=train))
        b = list(build_dataloader(_cfg(frames.shards, num_clips=2), train=train))
        assert [y.tolist() for _, y in a] == [y.tolist() for _, y in b]  # same order, same augmentation draws
        for (va, _), (vb, _) in zip(a, b, strict=True):
            assert va.shape == vb.shape
            diff = (va.float() - vb.float()).abs()
            assert diff.mean() < 4 and diff.max() < 40, (train, diff.mean(), diff.max())  # JPEG q95 vs H.264


@pytest.mark.parametrize("train", [True, False])
def test_gpu_decoding_path_on_cpu_tensors(tree, tmp_path, train, pretend_gpu):
    summary = write_shards(source=str(tree), output=str(tmp_path / "f"), samples_per_shard=6, store="frames",
                           frames_per_video=8, short_side=SIZE, progress=False)
    cfg = _cfg(summary.shards, num_clips=2, num_crops=3, hflip=True, crop_size=24, short_side=28)
    reference = list(build_dataloader(cfg, train=train))
    loader = build_dataloader(cfg.replace(decode_device="cuda"), train=train)
    assert loader.encoded
    raw, none, keys = next(iter(loader.dataset()))  # what a worker sends: encoded frames and boxes, keys
    assert isinstance(raw, EncodedBatch) and raw.data.dtype == torch.uint8 and not raw.decoded and none is None
    assert len(keys) == len(raw.items) and all(isinstance(k, str) for k in keys)
    loader.decode_device = torch.device("cpu")  # run the device decoder on CPU tensors
    got = list(loader)
    for (va, ya), (vb, yb) in zip(reference, got, strict=True):
        assert torch.equal(ya, yb) and va.shape == vb.shape and vb.dtype == torch.uint8
        diff = (va.float() - vb.float()).abs()
        assert diff.mean() < 1.5 and diff.max() < 60, (diff.mean(), diff.max())
    # mixed data: a video sample in a GPU-decoded batch is decoded on the CPU and joins the batch
    batch = next(iter(build_dataloader(cfg.replace(decode_device="cuda"), train=train).dataset()))[0]
    assert decode_batch(batch, "cpu")[0].shape == reference[0][0].shape


def test_convert_video_shards_resumably(tree, tmp_path, monkeypatch):
    video = write_shards(source=str(tree), output=str(tmp_path / "v"), samples_per_shard=4, progress=False)
    reference = write_shards(source=video.pattern, output=str(tmp_path / "ref"), samples_per_shard=5,
                             store="frames", frames_per_video=4, progress=False)
    assert reference.written == 12 and reference.num_classes == 3
    metas = [json.loads(s["json"]) for s in read_tar_samples(reference.shards)]
    assert sorted(m["source"] for m in metas) == sorted(f"class{c}/v{i}.mp4" for c in range(3) for i in range(4))
    real, calls = shards_mod.prepare_item, {"n": 0}

    def flaky(item, options):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(item, options)

    monkeypatch.setattr(shards_mod, "prepare_item", flaky)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        write_shards(source=video.pattern, output=str(out), samples_per_shard=5, store="frames",
                     frames_per_video=4, progress=False)
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar"] and not list(out.glob(".*.tmp"))
    monkeypatch.setattr(shards_mod, "prepare_item", real)
    again = write_shards(source=str(tmp_path / "v"), output=str(out), samples_per_shard=5, store="frames",
                         frames_per_video=4, progress=False)  # the folder of shards, detected as such
    assert again.resumed_shards == 1 and again.written == 12
    assert {Path(p).name: Path(p).read_bytes() for p in again.shards} == \
        {Path(p).name: Path(p).read_bytes() for p in reference.shards}
    with pytest.raises(ValueError, match="only be converted to frame shards"):
        write_shards(source=video.pattern, output=str(tmp_path / "x"), progress=False)


def _rewrite(shard: str, change) -> None:
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    import io

    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tar:
        for m, data in members:
            data = change(m.name, data)
            if data is None:
                continue
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def test_corrupt_jpeg_members_are_skipped_and_counted(tree, tmp_path, caplog, pretend_gpu):
    summary = write_shards(source=str(tree), output=str(tmp_path / "f"), samples_per_shard=12, store="frames",
                           frames_per_video=4, short_side=SIZE, progress=False, shuffle=False)
    keys = sorted({s["__key__"] for s in read_tar_samples(summary.shards)})
    bad = {keys[1]: "flip", keys[4]: "truncate", keys[7]: "drop"}

    def change(name, data):
        key, ext = name.split(".", 1)
        if ext != "00001.jpg" or key not in bad:
            return data
        if bad[key] == "flip":  # decodes to garbage with only a libjpeg warning: the CRC catches it
            return data[:300] + bytes(b ^ 0x55 for b in data[300:340]) + data[340:]
        return data[: len(data) // 2] if bad[key] == "truncate" else None

    _rewrite(summary.shards[0], change)
    for device in ("cpu", "cuda"):
        loader = build_dataloader(_cfg(summary.shards, decode_device=device, eval_batch_size=3), train=False)
        loader.decode_device = torch.device("cpu")
        with caplog.at_level(logging.WARNING, logger="inti_adapters.data"):
            n = sum(len(y) for _, y in loader)
        assert n == 9 and loader.corrupt_skipped == 3
        assert loader.read_report.read == 12 and loader.read_report.undecodable == 3
    assert caplog.text.count("CRC-32 mismatch") == 4 and "a member is missing" in caplog.text


def test_frame_reader_without_checksums_still_refuses_bad_jpegs():
    """Frame shards from other writers may lack frame_crc32: truncated or non-JPEG members still fail loudly."""
    from inti_adapters.data.decode import VideoDecodeError

    members, info = extract_frames(encode_video(_ramp_video(4), 10), frames_per_video=0, short_side=None)
    info.pop("frame_crc32")
    good = FrameReader({**members, "json": json.dumps(info).encode()})
    assert good.get_frames([0, 3]).shape == (2, 3, SIZE, SIZE + 8)
    for broken in (members["00002.jpg"][:200], b"\x00" * 300):
        reader = FrameReader({**members, "00002.jpg": broken, "json": json.dumps(info).encode()})
        with pytest.raises(VideoDecodeError):
            reader.get_frames([0, 2])
    no_json = FrameReader(dict(members))  # no metadata: every frame stored, in order
    assert no_json.num_frames == 4 and no_json.get_frames([3]).shape == (1, 3, SIZE, SIZE + 8)


def _tar_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def test_convert_shards_in_place(tree, tmp_path, monkeypatch):
    """inti-shards --source S --output S --store frames --overwrite: the old shards are replaced only when
    every new one is written (a kill mid-way loses nothing; the rerun finishes), sizes.json always consistent."""
    opts = dict(samples_per_shard=5, store="frames", frames_per_video=4, progress=False)
    folder = tmp_path / "s"
    video = write_shards(source=str(tree), output=str(folder), samples_per_shard=3, progress=False)
    originals = _tar_bytes(folder)
    reference = write_shards(source=video.pattern, output=str(tmp_path / "ref"), **opts)
    # without --overwrite: refused before anything is touched
    with pytest.raises(ValueError, match="lie in the output folder .*overwrite"):
        write_shards(source=str(folder), output=str(folder), **opts)
    assert _tar_bytes(folder) == originals and not (folder / ".inti-shards-in-place").exists()
    # killed while writing the new shards: the source is intact, the rerun resumes
    real, calls = shards_mod.prepare_item, {"n": 0}

    def flaky(item, options):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(item, options)

    monkeypatch.setattr(shards_mod, "prepare_item", flaky)
    with pytest.raises(KeyboardInterrupt):
        write_shards(source=str(folder), output=str(folder), overwrite=True, **opts)
    assert _tar_bytes(folder) == originals
    assert json.loads((folder / "sizes.json").read_text()) == {n: 3 for n in originals}
    monkeypatch.setattr(shards_mod, "prepare_item", real)
    # killed while swapping (after the first new shard replaced an old one): the rerun finishes the swap
    real_replace, seen = os.replace, {"n": 0}

    def dying_replace(src, dst):
        if Path(src).parent.name == ".inti-shards-in-place" and str(src).endswith(".tar"):
            seen["n"] += 1
            if seen["n"] == 2:
                raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        write_shards(source=str(folder), output=str(folder), overwrite=True, **opts)
    monkeypatch.setattr(os, "replace", real_replace)
    assert (folder / "shard-000000.tar").read_bytes() == (tmp_path / "ref" / "shard-000000.tar").read_bytes()
    assert not (folder / "sizes.json").exists()  # never a sizes.json that disagrees with the shards
    done = write_shards(source=str(folder), output=str(folder), overwrite=True, **opts)
    assert done.written == 12 and done.output == str(folder)
    assert len(originals) == 4 and _tar_bytes(folder) == _tar_bytes(tmp_path / "ref")  # 3 frame shards now
    assert json.loads((folder / "sizes.json").read_text()) == json.loads((tmp_path / "ref" / "sizes.json").read_text())
    assert sorted(p.name for p in folder.iterdir()) == sorted([".inti-shards.lock", "classes.json", "manifest.json",
                                                               "sizes.json", *_tar_bytes(folder)])  # no staging left
    assert [Path(s).name for s in done.shards] == [Path(s).name for s in reference.shards]
