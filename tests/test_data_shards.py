"""The shard writer: round trip from a folder tree, corrupt videos, class index, resume, atomic shards, CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import read_tar_samples

from inti_adapters.data import encode_video, load_class_index, open_video, write_shards
from inti_adapters.data import shards as shards_mod

CLASSES = ["cat", "dog", "emu"]


def _frames(seed: int, t: int, h: int = 24, w: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (1, h, w, 3)).astype(np.int64)
    drift = np.arange(t).reshape(t, 1, 1, 1) * 5
    return np.clip(base + drift, 0, 255).astype(np.uint8)


@pytest.fixture
def video_tree(tmp_path) -> Path:
    """3 classes x 4 tiny mp4s (3-9 frames), plus a corrupt file and a truncated file."""
    root = tmp_path / "videos"
    n = 0
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(4):
            (root / c / f"{c}_{i}.mp4").write_bytes(encode_video(_frames(n, 3 + 2 * (n % 4)), 10))
            n += 1
    (root / "dog" / "corrupt.mp4").write_bytes(b"\x00\x01garbage" * 50)
    good = (root / "emu" / "emu_0.mp4").read_bytes()
    (root / "emu" / "truncated.mp4").write_bytes(good[: len(good) // 5])
    (root / "cat" / "readme.txt").write_text("not a video")  # ignored: not a video extension
    return root


def test_round_trip_from_folder(video_tree, tmp_path):
    out = tmp_path / "shards"
    summary = write_shards(source=str(video_tree), output=str(out), samples_per_shard=5, progress=False)
    assert summary.written == 12 and summary.skipped == 2 and summary.num_classes == 3
    assert sorted(s for s, _ in summary.skipped_videos) == ["dog/corrupt.mp4", "emu/truncated.mp4"]
    assert len(summary.shards) == 3  # 14 videos / 5 per shard
    assert summary.pattern == str(out / "shard-{000000..000002}.tar")
    assert summary.bytes == sum(Path(s).stat().st_size for s in summary.shards)
    # class index beside the shards; sizes.json matches the tar contents
    assert load_class_index(out / "classes.json") == CLASSES
    sizes = json.loads((out / "sizes.json").read_text())
    samples = read_tar_samples(summary.shards)
    assert sum(sizes.values()) == len(samples) == 12
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == 12
    # every sample: video bytes identical to the source, label matching the folder, metadata
    for s in samples:
        meta = json.loads(s["json"])
        src = video_tree / meta["source"]
        assert s["mp4"] == src.read_bytes()
        assert int(s["cls"]) == CLASSES.index(src.parent.name) == meta["label"]
        reader = open_video(s["mp4"])
        assert meta["num_frames"] == reader.num_frames and meta["size"] == [32, 24] and meta["fps"] == 10
        assert meta["duration"] > 0
    # shards mix classes (videos are shuffled before sharding)
    first = [int(s["cls"]) for s in read_tar_samples(summary.shards[:1])]
    assert len(set(first)) > 1
    # nothing temporary left behind
    assert not list(out.glob("*.tmp"))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def test_resume_after_interruption(video_tree, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    write_shards(source=str(video_tree), output=str(reference), samples_per_shard=4, progress=False)

    out = tmp_path / "resumed"
    real = shards_mod.prepare_item
    calls = {"n": 0}

    def flaky(item, options):
        calls["n"] += 1
        if calls["n"] == 7:  # in the middle of the second shard
            raise KeyboardInterrupt
        return real(item, options)

    monkeypatch.setattr(shards_mod, "prepare_item", flaky)
    with pytest.raises(KeyboardInterrupt):
        write_shards(source=str(video_tree), output=str(out), samples_per_shard=4, progress=False)
    # only the first shard has a final name; it is complete and recorded; no temporary file is left
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["shards"]) == ["shard-000000.tar"] and not manifest["complete"]
    assert not list(out.glob("*.tmp"))
    # a hard kill would leave a temporary file: the next run must remove it
    (out / "shard-000001.tar.tmp").write_bytes(b"half a shard")

    monkeypatch.setattr(shards_mod, "prepare_item", real)
    summary = write_shards(source=str(video_tree), output=str(out), samples_per_shard=4, progress=False)
    assert summary.resumed_shards == 1 and summary.written == 12 and summary.skipped == 2
    assert not list(out.glob("*.tmp"))
    keys = [s["__key__"] for s in read_tar_samples(summary.shards)]
    assert len(keys) == len(set(keys)) == 12  # no duplicate, no loss
    assert _snapshot(out) == _snapshot(reference)  # byte-identical to an uninterrupted run
    # a complete run is a no-op the second time
    again = write_shards(source=str(video_tree), output=str(out), samples_per_shard=4, progress=False)
    assert again.resumed_shards == 4 and _snapshot(out) == _snapshot(reference)


def test_resume_refuses_other_options_and_overwrite_replaces(video_tree, tmp_path):
    out = tmp_path / "s"
    write_shards(source=str(video_tree), output=str(out), samples_per_shard=4, progress=False)
    with pytest.raises(ValueError, match="different run"):
        write_shards(source=str(video_tree), output=str(out), samples_per_shard=7, progress=False)
    summary = write_shards(source=str(video_tree), output=str(out), samples_per_shard=7, overwrite=True,
                           progress=False)
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert summary.written == 12


def test_parallel_workers_give_the_same_shards(video_tree, tmp_path):
    a = write_shards(source=str(video_tree), output=str(tmp_path / "a"), samples_per_shard=5, progress=False)
    b = write_shards(source=str(video_tree), output=str(tmp_path / "b"), samples_per_shard=5, workers=2,
                     progress=False)
    assert (a.written, a.skipped) == (b.written, b.skipped)
    assert _snapshot(tmp_path / "a") == _snapshot(tmp_path / "b")


def test_reencode_with_short_side(video_tree, tmp_path):
    summary = write_shards(source=str(video_tree), output=str(tmp_path / "r"), samples_per_shard=20,
                           reencode=True, short_side=16, crf=10, progress=False)
    assert summary.written == 12 and summary.skipped == 2
    for s in read_tar_samples(summary.shards):
        meta = json.loads(s["json"])
        src = av.open(io.BytesIO((video_tree / meta["source"]).read_bytes()))
        n_src = src.streams.video[0].frames
        src.close()
        frames = open_video(s["mp4"]).get_frames(range(meta["num_frames"]))
        assert frames.shape[2:] == (16, 22)  # 24x32 -> short side 16, long side 21.3 rounded to even
        assert meta["size"] == [22, 16] and meta["num_frames"] == n_src


def test_reencode_changes_frame_rate(tmp_path):
    (tmp_path / "v" / "a").mkdir(parents=True)
    (tmp_path / "v" / "a" / "x.mp4").write_bytes(encode_video(_frames(0, 10), 10))  # 1 s at 10 fps
    for fps, frames in ((5, 5), (20, 20)):
        summary = write_shards(source=str(tmp_path / "v"), output=str(tmp_path / f"o{fps}"), reencode=True,
                               fps=fps, progress=False)
        (s,) = read_tar_samples(summary.shards)
        meta = json.loads(s["json"])
        assert meta["num_frames"] == frames == open_video(s["mp4"]).num_frames and meta["fps"] == fps


def test_cli(video_tree, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = shards_mod.main(["--source", str(video_tree), "--output", str(out), "--samples-per-shard", "6",
                          "--no-progress", "--seed", "3"])
    text = capsys.readouterr().out
    assert rc == 0 and "12 videos written to 3 shards" in text and "2 skipped" in text
    assert f"shards: {out}/shard-{{000000..000002}}.tar" in text
    rc = shards_mod.main(["--source", str(tmp_path / "nope"), "--output", str(out), "--no-progress"])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        shards_mod.main(["--output", str(out)])  # --source is required
