"""The reading pipeline: shapes, epoch determinism, rank/worker splits, multi-view evaluation,
resume by skipping batches, corrupt and short videos, and the edge cases that must not hang."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from inti_adapters.data import DataConfig, build_dataloader, encode_video, expand_shards, open_video
from inti_adapters.data.decode import resolve_decoder, torchcodec_available
from inti_adapters.data.shards import SIZES_FILE, ShardSink, write_json_atomic

SIZE = 20
_VIDEOS: dict[tuple[int, int], bytes] = {}


def _video(seed: int, frames: int) -> bytes:
    """A tiny mp4 (cached): random texture that brightens frame after frame."""
    if (seed, frames) not in _VIDEOS:
        rng = np.random.default_rng(seed)
        base = rng.integers(0, 200, (1, SIZE, SIZE, 3)).astype(np.int64)
        clip = np.clip(base + 6 * np.arange(frames).reshape(-1, 1, 1, 1), 0, 255).astype(np.uint8)
        _VIDEOS[seed, frames] = encode_video(clip, 8, crf=10)
    return _VIDEOS[seed, frames]


def make_shards(folder: Path, sizes: list[int], *, bad: dict[int, bytes] | None = None,
                sizes_json: bool = True) -> list[str]:
    """Shards whose samples have unique labels 0..N-1 (so every read can be traced to one sample)."""
    folder.mkdir(parents=True, exist_ok=True)
    bad = bad or {}
    paths, label = [], 0
    for s, n in enumerate(sizes):
        path = folder / f"part-{s:06d}.tar"
        with ShardSink(path) as sink:
            for _ in range(n):
                video = bad.get(label, _video(label % 5, 3 + label % 6))
                sink.add(f"k{label:05d}", {"mp4": video, "cls": str(label).encode()})
                label += 1
            sink.commit()
        paths.append(str(path))
    if sizes_json:
        write_json_atomic(folder / SIZES_FILE, {Path(p).name: n for p, n in zip(paths, sizes, strict=True)})
    return paths


def _cfg(shards, **kw) -> DataConfig:
    base = dict(train_shards=shards, val_shards=shards, num_frames=4, crop_size=16, short_side=16,
                batch_size=4, shuffle_buffer=8, seed=0)
    base.update(kw)
    return DataConfig(**base)


def _epoch(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(v.clone(), y.clone()) for v, y in loader]


def _labels(batches) -> list[int]:
    return [int(x) for _, y in batches for x in y]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return make_shards(tmp_path_factory.mktemp("shards"), [8] * 6)  # 48 samples


def test_train_batches(shards):
    loader = build_dataloader(_cfg(shards), train=True)
    batches = _epoch(loader)
    assert len(batches) == len(loader) == 12  # 48 samples / 4
    for v, y in batches:
        assert v.shape == (4, 3, 4, 16, 16) and v.dtype == torch.uint8
        assert y.shape == (4,) and y.dtype == torch.int64
    # one pass over 6 shards x 8 samples: every sample exactly once
    assert sorted(_labels(batches)) == list(range(48))
    # training frames come out in temporal order: the test videos brighten over time
    means = torch.cat([v for v, _ in batches]).float().mean(dim=(1, 3, 4))
    assert (means[:, 1:] >= means[:, :-1] - 1).all()


def test_epochs_are_reproducible_and_differ(shards):
    cfg = _cfg(shards)
    a = _epoch(build_dataloader(cfg, train=True, epoch=0))
    b = _epoch(build_dataloader(cfg, train=True, epoch=0))
    assert _labels(a) == _labels(b)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b, strict=True))  # same crops too
    loader = build_dataloader(cfg, train=True)
    loader.set_epoch(1)
    c = _epoch(loader)
    assert _labels(c) != _labels(a) and sorted(_labels(c)) == sorted(_labels(a))
    other_seed = _epoch(build_dataloader(cfg.replace(seed=1), train=True))
    assert _labels(other_seed) != _labels(a)


def test_ranks_and_workers_read_disjoint_shards(tmp_path):
    shards = make_shards(tmp_path, [6] * 8)  # 2 shards for each of 2 ranks x 2 workers
    cfg = _cfg(shards, num_workers=2, batch_size=2)
    seen: dict[tuple[int, int], list[int]] = {}
    for rank in range(2):
        loader = build_dataloader(cfg, train=True, rank=rank, world_size=2, epoch=3)
        assert len(loader) == 12  # 24 samples per rank / batch 2
        for w in range(2):
            seen[rank, w] = _labels(loader.iter_worker(w))
    shard_sets = {k: {lab // 6 for lab in v} for k, v in seen.items()}
    keys = list(seen)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert not shard_sets[a] & shard_sets[b], (a, b, shard_sets)
    assert all(len(s) == 2 for s in shard_sets.values())
    assert sorted(x for v in seen.values() for x in v) == list(range(48))


def test_real_workers_match_the_simulated_ones(shards):
    cfg = _cfg(shards, num_workers=2, batch_size=2)
    loader = build_dataloader(cfg, train=True, rank=1, world_size=2, epoch=5)
    real = _epoch(loader)
    sim = [list(loader.iter_worker(w)) for w in range(2)]
    interleaved = [b for pair in zip(*sim, strict=True) for b in pair]  # DataLoader round-robin
    assert _labels(real) == _labels(interleaved)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(real, interleaved, strict=True))


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_batches_resumes_exactly(shards, workers):
    cfg = _cfg(shards, num_workers=workers, batch_size=3)
    loader = build_dataloader(cfg, train=True, epoch=2)
    full = _epoch(loader)
    assert len(full) == len(loader) == 16
    for k in (5, 16):
        resumed = build_dataloader(cfg, train=True)
        resumed.set_epoch(2)
        resumed.skip_batches(k)
        rest = _epoch(resumed)
        assert _labels(rest) == _labels(full[k:])
        assert all(torch.equal(x[0], y[0]) for x, y in zip(rest, full[k:], strict=True))
        assert len(_epoch(resumed)) == 16  # the skip applied to one iteration only
    with pytest.raises(ValueError, match="k must be"):
        loader.skip_batches(17)


def test_eval_views_each_sample_once_across_ranks_and_workers(tmp_path):
    shards = make_shards(tmp_path, [5, 3, 7, 4, 6])  # 25 samples, uneven shards
    cfg = _cfg(shards, num_workers=2, num_clips=2, num_crops=3, eval_batch_size=3, short_side=18)
    seen = Counter()
    for rank in range(2):
        loader = build_dataloader(cfg, train=False, rank=rank, world_size=2)
        batches = [b for w in range(2) for b in loader.iter_worker(w)]
        assert len(batches) == len(loader)
        for v, y in batches:
            assert v.shape[1:] == (6, 3, 4, 16, 16) and v.dtype == torch.uint8 and v.shape[0] == y.shape[0]
        seen.update(_labels(batches))
    assert seen == Counter(range(25))
    # the real DataLoader (2 worker processes) yields the same samples as the simulated workers
    loader = build_dataloader(cfg, train=False, rank=1, world_size=2)
    real = _epoch(loader)
    assert sorted(_labels(real)) == sorted(_labels(b for w in range(2) for b in loader.iter_worker(w)))
    assert len(real) == len(loader) and loader.num_samples == len(_labels(real))


def test_eval_is_deterministic_and_unshuffled(shards):
    cfg = _cfg(shards)
    a, b = _epoch(build_dataloader(cfg, train=False)), _epoch(build_dataloader(cfg, train=False, epoch=4))
    assert _labels(a) == list(range(48)) == _labels(b)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b, strict=True))


def test_fewer_shards_than_readers(tmp_path, caplog):
    shards = make_shards(tmp_path, [7, 6])  # 2 shards for 2 ranks x 2 workers = 4 readers
    cfg = _cfg(shards, num_workers=2, batch_size=1)
    with caplog.at_level(logging.WARNING, logger="inti_adapters.data"):
        build_dataloader(cfg, train=False, rank=0, world_size=2)
    assert "2 shards for 4 readers" in caplog.text
    seen_eval, seen_train = Counter(), []
    for rank in range(2):
        ev = build_dataloader(cfg, train=False, rank=rank, world_size=2)
        batches = [b for w in range(2) for b in ev.iter_worker(w)]
        assert len(batches) == len(ev)
        seen_eval.update(_labels(batches))
        tr = build_dataloader(cfg, train=True, rank=rank, world_size=2)
        assert len(tr) == 6  # 13 // 2 // 1 = 6 per rank, 3 per worker
        for w in range(2):
            seen_train.append(_labels(tr.iter_worker(w)))
    assert seen_eval == Counter(range(13))
    flat = [x for part in seen_train for x in part]
    assert all(len(p) == 3 for p in seen_train) and len(set(flat)) == 12  # readers keep disjoint samples


def test_more_readers_than_samples_fails_clearly(tmp_path):
    shards = make_shards(tmp_path, [2])
    cfg = _cfg(shards, num_workers=2, batch_size=1, train_samples=8)
    loader = build_dataloader(cfg, train=True, rank=1, world_size=2)  # reader slots 2 and 3 get no sample
    with pytest.raises(RuntimeError, match="no sample from a whole pass"):
        list(loader.iter_worker(1))


def test_corrupt_samples_are_skipped_and_counted(tmp_path, caplog):
    shards = make_shards(tmp_path, [6, 6], bad={1: b"garbage" * 20, 8: _video(0, 4)[:150]})
    cfg = _cfg(shards)
    loader = build_dataloader(cfg, train=False)
    with caplog.at_level(logging.WARNING, logger="inti_adapters.data"):
        labels = _labels(_epoch(loader))
    assert labels == [i for i in range(12) if i not in (1, 8)]
    assert loader.corrupt_skipped == 2
    assert caplog.text.count("skipping sample") == 2 and "k00001" in caplog.text
    with pytest.raises(RuntimeError, match="cannot decode sample 'k00001'"):
        _epoch(build_dataloader(cfg.replace(on_corrupt="raise"), train=False))


def test_all_corrupt_training_data_fails_instead_of_hanging(tmp_path):
    shards = make_shards(tmp_path / "bad", [4, 4], bad={i: b"x" * 64 for i in range(8)})
    loader = build_dataloader(_cfg(shards, batch_size=2, max_consecutive_failures=5), train=True)
    with pytest.raises(RuntimeError, match="5 samples in a row"):
        _epoch(loader)
    empty = make_shards(tmp_path / "empty", [0, 0], sizes_json=False)
    with pytest.raises(ValueError, match="0 batches"):
        build_dataloader(_cfg(empty), train=True)
    looping = build_dataloader(_cfg(empty, train_samples=8), train=True)
    with pytest.raises(RuntimeError, match="no sample from a whole pass"):
        _epoch(looping)


def test_short_video_and_dense_frame_choice(tmp_path):
    # frame i of the video has brightness 10 * i: the clip tells which frames were taken
    folder = tmp_path / "s"
    folder.mkdir()
    clips = {0: 20, 1: 2}  # 20 frames, and a 2-frame video shorter than the clip
    with ShardSink(folder / "v-000000.tar") as sink:
        for label, n in clips.items():
            frames = np.repeat((10 * np.arange(n, dtype=np.uint8))[:, None, None, None], SIZE, 1)
            sink.add(f"v{label}", {"mp4": encode_video(np.repeat(np.repeat(frames, SIZE, 2), 3, 3), 8, crf=0),
                                   "cls": str(label).encode()})
        sink.commit()
    cfg = _cfg([str(folder / "v-000000.tar")], sampling="dense", frame_stride=2, crop_size=SIZE, short_side=SIZE)
    (video, labels), = _epoch(build_dataloader(cfg, train=False))
    brightness = video[:, 0, 0].float().mean(dim=(2, 3)).round()  # (B, T) of view 0, channel 0
    assert labels.tolist() == [0, 1]
    np.testing.assert_allclose(brightness[0].numpy(), [60, 80, 100, 120], atol=2)  # frames 6, 8, 10, 12
    np.testing.assert_allclose(brightness[1].numpy(), [0, 0, 10, 10], atol=2)  # short: uniform, repeated


def test_resampled_stream(tmp_path):
    shards = make_shards(tmp_path, [5])
    cfg = _cfg(shards, resampled=True, train_samples=24, batch_size=4)
    a = build_dataloader(cfg, train=True, rank=1, world_size=2)
    assert len(a) == 3  # 24 // 2 // 4
    la = _labels(_epoch(a))
    assert len(la) == 12 and set(la) <= set(range(5))
    assert la == _labels(_epoch(build_dataloader(cfg, train=True, rank=1, world_size=2)))
    a.set_epoch(1)
    assert _labels(_epoch(a)) != la


def test_shard_specs_and_sizes(shards, tmp_path):
    folder = str(Path(shards[0]).parent)
    assert expand_shards(folder + "/part-{000000..000005}.tar") == shards
    assert expand_shards(folder + "/part-*.tar") == shards == expand_shards(folder)
    assert expand_shards(shards[:2]) == shards[:2]
    with pytest.raises(ValueError, match="do not exist"):
        expand_shards(folder + "/part-{000000..000009}.tar")
    with pytest.raises(ValueError, match="names no shard"):
        expand_shards(str(tmp_path / "nothing-*.tar"))
    # without sizes.json the epoch is sized from the tar headers
    unsized = make_shards(tmp_path / "u", [3, 5], sizes_json=False)
    assert build_dataloader(_cfg(unsized, batch_size=2), train=True).epoch_samples == 8
    assert json.loads((Path(shards[0]).parent / SIZES_FILE).read_text())["part-000000.tar"] == 8


def test_argument_errors(shards):
    cfg = _cfg(shards)
    with pytest.raises(ValueError, match="rank must be in"):
        build_dataloader(cfg, train=True, rank=2, world_size=2)
    with pytest.raises(ValueError, match="val_shards is None"):
        build_dataloader(cfg.replace(val_shards=None), train=False)
    with pytest.raises(ValueError, match="training loaders"):
        build_dataloader(cfg, train=False).skip_batches(1)
    with pytest.raises(ValueError, match="fewer than one per worker"):
        build_dataloader(cfg.replace(batch_size=30), train=True, world_size=2)
    with pytest.raises(TypeError, match="DataConfig"):
        build_dataloader({"train_shards": shards}, train=True)


def test_decoder_selection(shards):
    assert resolve_decoder("auto") == "pyav"  # torchcodec only when asked for
    if torchcodec_available():  # pragma: no cover - not installed on the build machine
        assert resolve_decoder("torchcodec") == "torchcodec"
        return
    with pytest.raises(ImportError, match="torchcodec is not installed"):
        build_dataloader(_cfg(shards, decoder="torchcodec"), train=True)
    reader = open_video(_video(1, 5), "auto")
    assert reader.num_frames == 5 and reader.get_frames([4, 0, 4]).shape == (3, 3, SIZE, SIZE)


def test_torchcodec_that_imports_but_cannot_load_ffmpeg_counts_as_unavailable(tmp_path, monkeypatch):
    """torchcodec >= 0.9 imports without FFmpeg and fails only on the first decoder: the check runs its loader."""
    import sys

    from inti_adapters.data import decode

    pkg = tmp_path / "torchcodec"
    (pkg / "decoders").mkdir(parents=True)
    (pkg / "__init__.py").write_text("ffmpeg_major_version = None\n")
    (pkg / "decoders" / "__init__.py").write_text("class VideoDecoder:\n    pass\n")
    (pkg / "_internally_replaced_utils.py").write_text(
        "def load_core_libraries():\n    raise RuntimeError('Could not load libtorchcodec. Likely causes: ...')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    real = {m for m in sys.modules if m == "torchcodec" or m.startswith("torchcodec.")}
    for name in [m for m in sys.modules if m == "torchcodec" or m.startswith("torchcodec.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(decode, "_TORCHCODEC_ERROR", [])
    assert not decode.torchcodec_available()
    assert decode._TORCHCODEC_ERROR == ["RuntimeError: Could not load libtorchcodec. Likely causes: ..."]
    with pytest.raises(ImportError, match="cannot load.*Could not load libtorchcodec"):
        decode.resolve_decoder("torchcodec")

    (pkg / "_internally_replaced_utils.py").write_text("def load_core_libraries():\n    return (7, 'lib')\n")
    for name in [m for m in sys.modules if m == "torchcodec" or m.startswith("torchcodec.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(decode, "_TORCHCODEC_ERROR", [])
    assert decode.torchcodec_available()
    for name in [m for m in sys.modules if (m == "torchcodec" or m.startswith("torchcodec.")) and m not in real]:
        del sys.modules[name]  # the fake's own modules; monkeypatch puts the real ones back
